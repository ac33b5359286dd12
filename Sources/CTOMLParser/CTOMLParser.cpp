// toml++ behind the C API of include/CTOMLParser.h. Everything a parse allocates belongs to one ctoml_document and
// goes with ctoml_free. Exceptions are toml++'s way of reporting a syntax error (TOML_EXCEPTIONS=1, Package.swift);
// they and any other (std::bad_alloc) are caught here: one crossing into Swift would terminate the process.

#include "CTOMLParser.h"

#include <deque>
#include <exception>
#include <new>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

// The header as toml++ ships it, whose `operator"" _toml` spelling newer clangs call deprecated.
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wdeprecated-literal-operator"
#include "toml.hpp"
#pragma clang diagnostic pop

struct ctoml_document {
    toml::table root;
    std::vector<ctoml_entry> entries;
    // Dates' and times' TOML text. A deque never moves what it holds, so the entries' pointers stay good.
    std::deque<std::string> texts;
    std::string error;
};

namespace {

template <typename T>
void setText(ctoml_document &document, ctoml_entry &entry, const T &value) {
    std::ostringstream out;
    out << value;
    const std::string &text = document.texts.emplace_back(out.str());
    entry.text = text.data();
    entry.text_length = text.size();
}

// Preorder: the entry first, then its children (toml++ bounds the nesting, so the recursion is bounded too).
void add(ctoml_document &document, const toml::node &node, const toml::key *key) {
    ctoml_entry entry{};
    if (key != nullptr) {
        entry.key = key->str().data();
        entry.key_length = key->str().size();
    }
    switch (node.type()) {
    case toml::node_type::table: {
        const toml::table &table = *node.as_table();
        entry.kind = CTOML_TABLE;
        entry.count = table.size();
        document.entries.push_back(entry);
        for (auto &&[childKey, child] : table) add(document, child, &childKey);
        return;
    }
    case toml::node_type::array: {
        const toml::array &array = *node.as_array();
        entry.kind = CTOML_ARRAY;
        entry.count = array.size();
        document.entries.push_back(entry);
        for (const toml::node &child : array) add(document, child, nullptr);
        return;
    }
    case toml::node_type::string: {
        const std::string &text = node.as_string()->get();
        entry.kind = CTOML_STRING;
        entry.text = text.data();
        entry.text_length = text.size();
        break;
    }
    case toml::node_type::integer:
        entry.kind = CTOML_INTEGER;
        entry.integer = node.as_integer()->get();
        break;
    case toml::node_type::floating_point:
        entry.kind = CTOML_FLOAT;
        entry.floating = node.as_floating_point()->get();
        break;
    case toml::node_type::boolean:
        entry.kind = CTOML_BOOLEAN;
        entry.boolean = node.as_boolean()->get() ? 1 : 0;
        break;
    case toml::node_type::date:
        entry.kind = CTOML_DATE;
        setText(document, entry, node.as_date()->get());
        break;
    case toml::node_type::time:
        entry.kind = CTOML_TIME;
        setText(document, entry, node.as_time()->get());
        break;
    case toml::node_type::date_time:
        entry.kind = CTOML_DATE_TIME;
        setText(document, entry, node.as_date_time()->get());
        break;
    default:  // node_type::none: not in a parsed document
        entry.kind = CTOML_STRING;
        entry.text = "";
        break;
    }
    document.entries.push_back(entry);
}

void fail(ctoml_result *result, const char *description, uint32_t line, uint32_t column) {
    result->entries = nullptr;
    result->entry_count = 0;
    result->error = description;
    result->line = line;
    result->column = column;
}

}  // namespace

extern "C" ctoml_document *ctoml_parse(const void *text, size_t length, ctoml_result *result) {
    ctoml_document *document = new (std::nothrow) ctoml_document();
    if (document == nullptr) {
        fail(result, "out of memory", 0, 0);
        return nullptr;
    }
    try {
        document->root = toml::parse(std::string_view(static_cast<const char *>(text), length));
        add(*document, document->root, nullptr);
        result->entries = document->entries.data();
        result->entry_count = document->entries.size();
        result->error = nullptr;
        result->line = 0;
        result->column = 0;
    } catch (const toml::parse_error &error) {
        try {
            document->error = std::string(error.description());
            fail(result, document->error.c_str(), error.source().begin.line, error.source().begin.column);
        } catch (...) {
            fail(result, "out of memory", error.source().begin.line, error.source().begin.column);
        }
    } catch (const std::bad_alloc &) {
        fail(result, "out of memory", 0, 0);
    } catch (...) {
        fail(result, "unexpected error in the TOML parser", 0, 0);
    }
    return document;
}

extern "C" void ctoml_free(ctoml_document *document) { delete document; }
