#ifndef CTOMLPARSER_H
#define CTOMLPARSER_H

// A C face for toml++ (toml.hpp beside the implementation), for Swift: one call parses a document into a flat
// list of entries, one call frees everything. Nothing C++ crosses this header, and no exception leaves it.

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    CTOML_TABLE = 0,
    CTOML_ARRAY = 1,
    CTOML_STRING = 2,
    CTOML_INTEGER = 3,
    CTOML_FLOAT = 4,
    CTOML_BOOLEAN = 5,
    CTOML_DATE = 6,
    CTOML_TIME = 7,
    CTOML_DATE_TIME = 8,
} ctoml_kind;

/// One value of the document. The entries are the document in preorder: a table or an array is followed by its
/// `count` children (each with all of its own descendants). A table's children come in toml++'s key order.
typedef struct {
    ctoml_kind kind;
    /// The key of this entry in its table; NULL for an array's element and for the root.
    const char *key;
    size_t key_length;
    /// A string's UTF-8 bytes, or a date's, time's or date-time's TOML text.
    const char *text;
    size_t text_length;
    int64_t integer;
    double floating;
    int boolean;
    /// A table's or array's number of children.
    size_t count;
} ctoml_entry;

typedef struct ctoml_document ctoml_document;

/// What `ctoml_parse` found: the entries, or an error (`error` non-NULL, 1-based `line` and `column`).
typedef struct {
    const ctoml_entry *entries;
    size_t entry_count;
    const char *error;
    uint32_t line;
    uint32_t column;
} ctoml_result;

/// Parses `length` bytes of TOML (UTF-8; a NUL byte is a syntax error, not the end). Every pointer in `*result`
/// stays valid until `ctoml_free` of the returned document, which must be called exactly once (it may be NULL,
/// with `result->error` set, when memory ran out).
ctoml_document *ctoml_parse(const void *text, size_t length, ctoml_result *result);

void ctoml_free(ctoml_document *document);

#ifdef __cplusplus
}
#endif

#endif
