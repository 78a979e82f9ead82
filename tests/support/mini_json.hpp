// A small strict JSON parser for tests: checks that what oomguard writes is
// JSON and lets a test look inside. Not for production use.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace mini_json {

struct Value {
    enum Kind { null, boolean, number, string, array, object } kind = null;
    bool b = false;
    double n = 0;
    std::string s;
    std::vector<Value> items;
    std::map<std::string, Value> fields;
    Value const& operator[](std::string const& k) const {
        auto it = fields.find(k);
        if (it == fields.end()) throw std::runtime_error("no field " + k);
        return it->second;
    }
    bool has(std::string const& k) const { return fields.count(k) != 0; }
};

class Parser {
public:
    explicit Parser(std::string const& text) : t_(text) {}
    Value parse() {
        Value v = value();
        ws();
        if (i_ != t_.size()) fail("trailing characters");
        return v;
    }

private:
    [[noreturn]] void fail(char const* what) {
        throw std::runtime_error(std::string("JSON: ") + what + " at offset " + std::to_string(i_));
    }
    void ws() {
        while (i_ < t_.size() && (t_[i_] == ' ' || t_[i_] == '\n' || t_[i_] == '\r' || t_[i_] == '\t')) ++i_;
    }
    bool eat(char c) {
        ws();
        if (i_ < t_.size() && t_[i_] == c) {
            ++i_;
            return true;
        }
        return false;
    }
    void expect(char c) {
        if (!eat(c)) fail("unexpected character");
    }
    std::string str() {
        expect('"');
        std::string out;
        while (i_ < t_.size() && t_[i_] != '"') {
            char c = t_[i_++];
            if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
            if (c == '\\') {
                if (i_ >= t_.size()) fail("bad escape");
                char e = t_[i_++];
                switch (e) {
                    case '"': out += '"'; break;
                    case '\\': out += '\\'; break;
                    case '/': out += '/'; break;
                    case 'n': out += '\n'; break;
                    case 'r': out += '\r'; break;
                    case 't': out += '\t'; break;
                    case 'b': out += '\b'; break;
                    case 'f': out += '\f'; break;
                    case 'u':
                        if (i_ + 4 > t_.size()) fail("bad \\u escape");
                        out += '?';
                        i_ += 4;
                        break;
                    default: fail("bad escape");
                }
            } else {
                out += c;
            }
        }
        if (i_ >= t_.size()) fail("unterminated string");
        ++i_;
        return out;
    }
    Value value() {
        ws();
        if (i_ >= t_.size()) fail("unexpected end");
        Value v;
        char c = t_[i_];
        if (c == '{') {
            ++i_;
            v.kind = Value::object;
            if (eat('}')) return v;
            do {
                ws();
                std::string k = str();
                expect(':');
                v.fields[k] = value();
            } while (eat(','));
            expect('}');
        } else if (c == '[') {
            ++i_;
            v.kind = Value::array;
            if (eat(']')) return v;
            do v.items.push_back(value());
            while (eat(','));
            expect(']');
        } else if (c == '"') {
            v.kind = Value::string;
            v.s = str();
        } else if (t_.compare(i_, 4, "true") == 0) {
            v.kind = Value::boolean;
            v.b = true;
            i_ += 4;
        } else if (t_.compare(i_, 5, "false") == 0) {
            v.kind = Value::boolean;
            i_ += 5;
        } else if (t_.compare(i_, 4, "null") == 0) {
            i_ += 4;
        } else {
            std::size_t used = 0;
            try {
                v.n = std::stod(t_.substr(i_, 40), &used);
            } catch (...) {
                fail("bad value");
            }
            if (used == 0) fail("bad number");
            v.kind = Value::number;
            i_ += used;
        }
        return v;
    }
    std::string const& t_;
    std::size_t i_ = 0;
};

inline Value parse(std::string const& text) { return Parser(text).parse(); }

}  // namespace mini_json
