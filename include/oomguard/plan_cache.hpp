// The plan cache: what a workload learned (its plan, the planner's model of the
// step, the failed ceilings) kept in a small versioned JSON file, so that a
// restarted job starts where the last one settled instead of at its first OOM.
//
//   oomguard::PlanCache cache("plans.json");
//   auto remembered = cache.attach(train, {"train", oomguard::device_identity(budget, "A100"), "resnet50 v3"});
//
// An entry is keyed by the workload's name, the device (name, total memory,
// MIG instance), the precision ladder, the global batch and your fingerprint
// (the model, its code version: whatever changes the step's memory). The file
// is replaced atomically (a temporary file in the same directory, fsync,
// rename), under an flock on "<file>.lock" while what is on disk is merged in,
// so a kill at any instant leaves the old file or the new one and two
// processes lose no entry of each other's. A file that cannot be read (corrupt,
// truncated, another version, a directory, no permission) is reported once --
// a plan_cache_warning event on the batch, which a Report shows, and
// warnings() -- and is otherwise ignored: the cache never stops training.
// POSIX (flock, fsync, rename); elsewhere every save is a warning.
// Opt-in; not in the umbrella header.
#pragma once

#include <oomguard/adaptive_batch.hpp>
#include <oomguard/detail/format.hpp>
#include <oomguard/detail/json.hpp>
#include <oomguard/detail/std_throw.hpp>
#include <oomguard/memory_budget.hpp>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#define OOMGUARD_PLAN_CACHE_POSIX 1
#else
#define OOMGUARD_PLAN_CACHE_POSIX 0
#endif

namespace oomguard {

/// The device an entry was learned on: a different one (another total memory,
/// another MIG instance) is another entry.
struct DeviceIdentity {
    std::string name;              ///< the device's name (cudaDeviceProp::name, or any label you choose)
    std::size_t total_memory = 0;  ///< its total memory, bytes
    std::string mig;               ///< the MIG instance (its UUID), empty when not on MIG
};

/// The device identity of `budget`'s device: `name` (and `mig`) as you give
/// them, the total memory as the budget's backend reports it (0 when it cannot).
template <class Backend>
DeviceIdentity device_identity(MemoryBudget<Backend> const& budget, std::string name, std::string mig = {}) {
    std::size_t free = 0, total = 0;
    if (!budget.backend().memory_info(budget.device(), &free, &total).ok()) total = 0;
    return DeviceIdentity{std::move(name), total, std::move(mig)};
}

/// What identifies a workload's entry besides the options PlanCache::attach
/// reads from the batch (the precision ladder, the global batch).
struct PlanKey {
    std::string workload;     ///< the workload's name ("train", "eval"): one entry each
    DeviceIdentity device;    ///< where it runs
    std::string fingerprint;  ///< yours: the model and anything else that changes the step's memory
};

/// One entry of the file: its key and what the workload learned.
struct PlanCacheEntry {
    std::string workload;          ///< PlanKey::workload
    std::string device;            ///< DeviceIdentity::name
    std::size_t total_memory = 0;  ///< DeviceIdentity::total_memory, bytes
    std::string mig;               ///< DeviceIdentity::mig
    std::string precisions;        ///< the ladder, as "fp32,bf16"
    std::size_t global_batch = 0;  ///< G
    std::string fingerprint;       ///< PlanKey::fingerprint
    LearnedPlan learned;           ///< the plan, the model, the grow-back ceiling

    /// Whether `o` has the same key.
    bool same_key(PlanCacheEntry const& o) const noexcept {
        return workload == o.workload && device == o.device && total_memory == o.total_memory && mig == o.mig &&
               precisions == o.precisions && global_batch == o.global_batch && fingerprint == o.fingerprint;
    }
};

namespace detail {

// A JSON value, as much of JSON as the cache file needs: numbers are unsigned
// integers (anything else in a number is an error).
struct PlanJson {
    enum class Type : unsigned char { null, boolean, number, string, array, object };
    Type type = Type::null;
    bool boolean = false;
    std::uint64_t number = 0;
    std::string text;
    std::vector<PlanJson> items;   // an array's
    std::vector<std::string> keys;  // an object's, in order; values[k] is keys[k]'s
    std::vector<PlanJson> values;   // (not a vector of pairs: a pair of an incomplete type is not allowed)

    PlanJson const* get(std::string_view key) const noexcept {
        if (type != Type::object) return nullptr;
        for (std::size_t k = 0; k < keys.size(); ++k)
            if (keys[k] == key) return &values[k];
        return nullptr;
    }
};

// A strict recursive-descent reader: the whole text one value, depth-limited.
class PlanJsonReader {
public:
    explicit PlanJsonReader(std::string_view text) noexcept : s_(text) {}

    // False with `error` (saying at which byte) on anything but one valid value.
    bool parse(PlanJson& out, std::string& error) {
        if (!value(out, 0)) {
            error = error_ + " at byte " + std::to_string(at_);
            return false;
        }
        space();
        if (at_ != s_.size()) {
            error = std::string("text after the document at byte ") + std::to_string(at_);
            return false;
        }
        return true;
    }

private:
    bool fail(char const* why) {
        if (error_.empty()) error_ = why;
        return false;
    }
    void space() noexcept {
        while (at_ < s_.size() && (s_[at_] == ' ' || s_[at_] == '\n' || s_[at_] == '\r' || s_[at_] == '\t')) ++at_;
    }
    bool literal(char const* word) noexcept {
        std::size_t const n = std::strlen(word);
        if (s_.substr(at_, n) != word) return false;
        at_ += n;
        return true;
    }
    bool value(PlanJson& v, int depth) {
        if (depth > 16) return fail("nested too deeply");
        space();
        if (at_ >= s_.size()) return fail("the text ends where a value should be");
        char const c = s_[at_];
        if (c == '{') return object(v, depth);
        if (c == '[') return array(v, depth);
        if (c == '"') {
            v.type = PlanJson::Type::string;
            return string(v.text);
        }
        if (c >= '0' && c <= '9') return number(v);
        if (literal("true")) {
            v.type = PlanJson::Type::boolean;
            v.boolean = true;
            return true;
        }
        if (literal("false")) {
            v.type = PlanJson::Type::boolean;
            return true;
        }
        if (literal("null")) return true;
        return fail("not a JSON value (numbers here are whole and not negative)");
    }
    bool number(PlanJson& v) {
        v.type = PlanJson::Type::number;
        std::uint64_t n = 0;
        std::size_t const first = at_;
        while (at_ < s_.size() && s_[at_] >= '0' && s_[at_] <= '9') {
            std::uint64_t const d = static_cast<std::uint64_t>(s_[at_] - '0');
            if (n > (~std::uint64_t{0} - d) / 10) return fail("a number too large");
            n = n * 10 + d;
            ++at_;
        }
        if (at_ - first > 1 && s_[first] == '0') return fail("a number with a leading zero");
        if (at_ < s_.size() && (s_[at_] == '.' || s_[at_] == 'e' || s_[at_] == 'E'))
            return fail("a number that is not whole");
        v.number = n;
        return true;
    }
    static void utf8(std::string& out, unsigned cp) {
        if (cp < 0x80) {
            out += static_cast<char>(cp);
        } else if (cp < 0x800) {
            out += static_cast<char>(0xC0 | (cp >> 6));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += static_cast<char>(0xE0 | (cp >> 12));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else {
            out += static_cast<char>(0xF0 | (cp >> 18));
            out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
    }
    bool hex4(unsigned& cp) {
        if (s_.size() - at_ < 4) return fail("a \\u escape cut short");
        cp = 0;
        for (int i = 0; i < 4; ++i) {
            char const h = s_[at_++];
            unsigned d = 0;
            if (h >= '0' && h <= '9')
                d = static_cast<unsigned>(h - '0');
            else if (h >= 'a' && h <= 'f')
                d = static_cast<unsigned>(h - 'a' + 10);
            else if (h >= 'A' && h <= 'F')
                d = static_cast<unsigned>(h - 'A' + 10);
            else
                return fail("a \\u escape with a digit that is not hexadecimal");
            cp = cp * 16 + d;
        }
        return true;
    }
    bool string(std::string& out) {
        ++at_;  // the opening quote
        out.clear();
        for (;;) {
            if (at_ >= s_.size()) return fail("a string that does not end");
            char const c = s_[at_++];
            if (c == '"') return true;
            if (static_cast<unsigned char>(c) < 0x20) return fail("a control character in a string");
            if (c != '\\') {
                out += c;
                continue;
            }
            if (at_ >= s_.size()) return fail("a string that does not end");
            char const e = s_[at_++];
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    unsigned cp = 0;
                    if (!hex4(cp)) return false;
                    if (cp >= 0xD800 && cp < 0xDC00) {  // a surrogate pair
                        unsigned lo = 0;
                        if (!literal("\\u") || !hex4(lo) || lo < 0xDC00 || lo > 0xDFFF)
                            return fail("a lone surrogate in a \\u escape");
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                        return fail("a lone surrogate in a \\u escape");
                    }
                    utf8(out, cp);
                    break;
                }
                default: return fail("an unknown escape in a string");
            }
        }
    }
    bool array(PlanJson& v, int depth) {
        v.type = PlanJson::Type::array;
        ++at_;
        space();
        if (at_ < s_.size() && s_[at_] == ']') {
            ++at_;
            return true;
        }
        for (;;) {
            v.items.emplace_back();
            if (!value(v.items.back(), depth + 1)) return false;
            space();
            if (at_ >= s_.size()) return fail("an array that does not end");
            char const c = s_[at_++];
            if (c == ']') return true;
            if (c != ',') return fail("an array without ',' or ']' after an item");
        }
    }
    bool object(PlanJson& v, int depth) {
        v.type = PlanJson::Type::object;
        ++at_;
        space();
        if (at_ < s_.size() && s_[at_] == '}') {
            ++at_;
            return true;
        }
        for (;;) {
            space();
            if (at_ >= s_.size() || s_[at_] != '"') return fail("an object whose key is not a string");
            std::string key;
            if (!string(key)) return false;
            space();
            if (at_ >= s_.size() || s_[at_] != ':') return fail("an object without ':' after a key");
            ++at_;
            v.keys.push_back(std::move(key));
            v.values.emplace_back();
            if (!value(v.values.back(), depth + 1)) return false;
            space();
            if (at_ >= s_.size()) return fail("an object that does not end");
            char const c = s_[at_++];
            if (c == '}') return true;
            if (c != ',') return fail("an object without ',' or '}' after a member");
        }
    }

    std::string_view s_;
    std::size_t at_ = 0;
    std::string error_;
};

}  // namespace detail

/// A plan cache file: load, merge and save workloads' entries, and attach
/// AdaptiveBatch workloads to it (see the top of this header). Not
/// thread-safe: one object per thread, or a lock of yours; processes share a
/// file safely.
class PlanCache {
public:
    /// The file's "format" value: a file without it is not a plan cache.
    static constexpr char const* format_name = "oomguard plan cache";
    /// The file layout this code reads and writes, its "version".
    static constexpr unsigned version = 1;

    /// A cache in the file at `path` (created at the first save). Nothing is
    /// read yet. Throws std::invalid_argument for an empty path.
    explicit PlanCache(std::string path) : path_(std::move(path)) {
        if (path_.empty())
            detail::throw_invalid("oomguard: PlanCache: the path is empty; give the cache file's path, such as "
                                  "plans.json");
    }

    /// Not copyable or movable: attach() keeps a pointer to this cache in the batch's observer.
    PlanCache(PlanCache const&) = delete;
    /// Not assignable (see the copy constructor).
    PlanCache& operator=(PlanCache const&) = delete;

    /// The file's path.
    std::string const& path() const noexcept { return path_; }

    /// Every warning so far, each once, in order: the file could not be read
    /// (and was ignored) or written (training went on without saving).
    std::vector<std::string> const& warnings() const noexcept { return warnings_; }

    /// The entry for `key` under `options` (their precision ladder and global
    /// batch) in the file as it is now; false when there is none, or the file
    /// cannot be read (a warning, once).
    bool find(PlanKey const& key, BatchOptions const& options, PlanCacheEntry& out) {
        PlanCacheEntry const want = make_entry(key, options, LearnedPlan{});
        std::vector<PlanCacheEntry> entries;
        std::string error;
        if (!read_file(entries, error)) {
            warn(error);
            return false;
        }
        for (auto& e : entries)
            if (e.same_key(want)) {
                out = std::move(e);
                return true;
            }
        return false;
    }

    /// Writes `entry` into the file, keeping every other entry on disk (under
    /// the lock, merged with what is there now). False, with a warning (once
    /// per distinct text), when it could not; the file is then as it was.
    bool save(PlanCacheEntry const& entry) {
        std::string error;
        if (!write_entry(entry, error)) {
            warn(error);
            return false;
        }
        return true;
    }

    /// Attaches `batch` under `key`: the batch starts at the entry's plan when
    /// the file has one for this key (a plan_loaded event), and the entry is
    /// saved whenever a global batch commits under a plan other than the one
    /// last saved, or with a short remainder now cut into other pieces, or
    /// once the caches are emptied before each batch
    /// (AdaptiveBatch::release_before_batches()), the first commit included:
    /// a plan_saved event. A file that
    /// cannot be read or written, or an entry that does not fit the batch's
    /// options, is a plan_cache_warning event (each text once per cache) and
    /// otherwise ignored. The cache must outlive the returned registration,
    /// which ends the saving. Call it before the batch's first run(). Throws
    /// std::invalid_argument for an empty workload name, std::bad_alloc.
    [[nodiscard]] ObserverRegistration attach(AdaptiveBatch& batch, PlanKey key) {
        if (key.workload.empty())
            detail::throw_invalid("oomguard: PlanCache::attach: the workload's name is empty; give one per "
                                  "workload, such as \"train\" or \"eval\"");
        auto state = std::make_shared<Attached>();
        state->key = std::move(key);
        state->device = batch.plan().device;
        std::size_t const seen = warnings_.size();
        PlanCacheEntry found;
        if (find(state->key, batch.options(), found) && found.learned.plan.device != state->device) {
            // A plan for another device (one the workload failed over to) is not this one's.
            warn("the entry for " + state->key.workload + " holds a plan on GPU " +
                 std::to_string(found.learned.plan.device) + ", and this workload starts on GPU " +
                 std::to_string(state->device) + "; it is ignored and will be rewritten");
        } else if (found.learned.plan.micro_batch != 0) {
            try {
                batch.restore(found.learned);
                state->remember(found.learned);
            } catch (std::invalid_argument const& e) {
                warn(std::string("the entry for ") + state->key.workload + " does not fit its options (" + e.what() +
                     "); it is ignored and will be rewritten");
            }
        }
        for (std::size_t i = seen; i < warnings_.size(); ++i)
            batch.announce(BatchEventKind::plan_cache_warning, warnings_[i].c_str());
        return batch.observe([this, state](BatchEvent const& e) {
            if (e.kind != BatchEventKind::commit || e.batch == nullptr) return;
            LearnedPlan const l = e.batch->learned();
            // After a failover the plan is another device's: the key names the one it started on.
            if (l.plan.device != state->device) return;
            if (state->saved(l)) return;
            // The observer hears a const batch; the object is not: announce() only tells observers.
            AdaptiveBatch& b = const_cast<AdaptiveBatch&>(*e.batch);
            std::size_t const before = warnings_.size();
            bool const ok = save(make_entry(state->key, b.options(), l));
            state->remember(l);  // tried once per plan: a file that cannot be written is not retried per batch
            if (ok) b.announce(BatchEventKind::plan_saved, "");
            for (std::size_t i = before; i < warnings_.size(); ++i)
                b.announce(BatchEventKind::plan_cache_warning, warnings_[i].c_str());
        });
    }

    /// The entry `key` and `options` make for `learned`. Throws std::bad_alloc.
    static PlanCacheEntry make_entry(PlanKey const& key, BatchOptions const& options, LearnedPlan const& learned) {
        PlanCacheEntry e;
        e.workload = key.workload;
        e.device = key.device.name;
        e.total_memory = key.device.total_memory;
        e.mig = key.device.mig;
        for (Precision p : options.precisions) {
            if (!e.precisions.empty()) e.precisions += ',';
            e.precisions += to_string(p);
        }
        e.global_batch = options.global_batch;
        e.fingerprint = key.fingerprint;
        e.learned = learned;
        return e;
    }

    /// `entries` as the file's text. Throws std::bad_alloc.
    static std::string to_json(std::vector<PlanCacheEntry> const& entries) {
        std::string o = "{\n  \"format\": " + detail::json_string(format_name) +
                        ",\n  \"version\": " + std::to_string(version) + ",\n  \"entries\": [";
        for (std::size_t k = 0; k < entries.size(); ++k) {
            PlanCacheEntry const& e = entries[k];
            StepModel const& m = e.learned.model;
            Plan const& p = e.learned.plan;
            o += k == 0 ? "\n    {" : ",\n    {";
            o += "\"workload\": " + detail::json_string(e.workload) + ", \"device\": " + detail::json_string(e.device) +
                 ", \"total_memory\": " + std::to_string(e.total_memory) + ", \"mig\": " + detail::json_string(e.mig) +
                 ", \"precisions\": " + detail::json_string(e.precisions) +
                 ", \"global_batch\": " + std::to_string(e.global_batch) +
                 ", \"fingerprint\": " + detail::json_string(e.fingerprint) + ",\n     \"plan\": {\"micro_batch\": " +
                 std::to_string(p.micro_batch) + ", \"precision\": " + detail::json_string(to_string(p.precision)) +
                 ", \"precision_index\": " + std::to_string(p.precision_index) +
                 ", \"device\": " + std::to_string(p.device < 0 ? 0 : p.device) + "}, \"grow_ceiling\": " +
                 std::to_string(e.learned.grow_ceiling) + ", \"tail\": " + std::to_string(e.learned.tail) +
                 ", \"release_before_batches\": " + (e.learned.release_before_batches ? "true" : "false") +
                 ",\n     \"model\": {\"points\": " +
                 points(m.points, m.n_points) + ", \"bounds\": " + points(m.bounds, m.n_bounds) +
                 ", \"low\": " + std::to_string(m.low) + ", \"high\": " + std::to_string(m.high) +
                 ", \"has_base\": " + (m.has_base ? "true" : "false") + ", \"base\": " + std::to_string(m.base) +
                 ", \"limit\": " + std::to_string(m.limit) + "}}";
        }
        o += entries.empty() ? "]\n}\n" : "\n  ]\n}\n";
        return o;
    }

    /// Reads a file's text into `entries`; false with `error` (what is wrong,
    /// and where) when it is not a plan cache of this version. Throws std::bad_alloc.
    static bool from_json(std::string_view text, std::vector<PlanCacheEntry>& entries, std::string& error,
                          bool* foreign = nullptr) {
        detail::PlanJson doc;
        if (!detail::PlanJsonReader(text).parse(doc, error)) {
            error = "not valid JSON (" + error + ")";
            return false;
        }
        detail::PlanJson const* format = doc.get("format");
        if (format == nullptr || format->type != detail::PlanJson::Type::string || format->text != format_name) {
            error = std::string("not a plan cache (no \"format\": \"") + format_name + "\")";
            return false;
        }
        detail::PlanJson const* v = doc.get("version");
        if (v == nullptr || v->type != detail::PlanJson::Type::number || v->number != version) {
            if (foreign != nullptr) *foreign = v != nullptr && v->type == detail::PlanJson::Type::number;
            error = std::string("version ") + (v != nullptr && v->type == detail::PlanJson::Type::number ? std::to_string(v->number)
                                                                                           : std::string("missing")) +
                    ", and this oomguard reads version " + std::to_string(version);
            return false;
        }
        detail::PlanJson const* list = doc.get("entries");
        if (list == nullptr || list->type != detail::PlanJson::Type::array) {
            error = "no \"entries\" array";
            return false;
        }
        entries.clear();
        for (std::size_t k = 0; k < list->items.size(); ++k) {
            PlanCacheEntry e;
            std::string why;
            if (!entry(list->items[k], e, why)) {
                error = std::string("entry ") + std::to_string(k) + ": " + why;
                return false;
            }
            entries.push_back(std::move(e));
        }
        return true;
    }

private:
    struct Attached {
        PlanKey key;
        int device = 0;  // the device the workload starts on, which the key names
        // What the entry last saved (or loaded) holds of what a save compares:
        // the plan, the remainder's pieces, the release before batches.
        Plan plan;
        std::size_t tail = 0;
        bool release = false;
        bool has_saved = false;
        void remember(LearnedPlan const& l) noexcept {
            plan = l.plan;
            tail = l.tail;
            release = l.release_before_batches;
            has_saved = true;
        }
        bool saved(LearnedPlan const& l) const noexcept {
            return has_saved && l.plan == plan && l.tail == tail && l.release_before_batches == release;
        }
    };

    void warn(std::string const& what) {
        std::string const text = "oomguard: plan cache " + path_ + ": " + what;
        for (auto const& w : warnings_)
            if (w == text) return;
        warnings_.push_back(text);
    }

    template <class P>
    static std::string points(P const* p, std::size_t n) {
        std::string o = "[";
        for (std::size_t i = 0; i < n; ++i) {
            o += i == 0 ? "[" : ", [";
            o += std::to_string(p[i].m) + ", " + std::to_string(p[i].bytes) + "]";
        }
        return o + "]";
    }

    static bool size_of(detail::PlanJson const* v, std::size_t& out) noexcept {
        if (v == nullptr || v->type != detail::PlanJson::Type::number ||
            v->number > static_cast<std::uint64_t>(static_cast<std::size_t>(-1)))
            return false;
        out = static_cast<std::size_t>(v->number);
        return true;
    }
    static bool text_of(detail::PlanJson const* v, std::string& out) {
        if (v == nullptr || v->type != detail::PlanJson::Type::string) return false;
        out = v->text;
        return true;
    }
    template <class P>
    static bool points_of(detail::PlanJson const* v, P* out, std::size_t cap, std::size_t& n) noexcept {
        if (v == nullptr || v->type != detail::PlanJson::Type::array || v->items.size() > cap) return false;
        n = 0;
        for (auto const& item : v->items) {
            if (item.type != detail::PlanJson::Type::array || item.items.size() != 2) return false;
            if (!size_of(&item.items[0], out[n].m) || !size_of(&item.items[1], out[n].bytes) || out[n].m == 0)
                return false;
            ++n;
        }
        return true;
    }

    static bool entry(detail::PlanJson const& j, PlanCacheEntry& e, std::string& why) {
        if (j.type != detail::PlanJson::Type::object) return (why = "not an object"), false;
        if (!text_of(j.get("workload"), e.workload) || !text_of(j.get("device"), e.device) ||
            !size_of(j.get("total_memory"), e.total_memory) || !text_of(j.get("mig"), e.mig) ||
            !text_of(j.get("precisions"), e.precisions) || !size_of(j.get("global_batch"), e.global_batch) ||
            !text_of(j.get("fingerprint"), e.fingerprint) || !size_of(j.get("grow_ceiling"), e.learned.grow_ceiling))
            return (why = "a key field is missing or of the wrong type"), false;
        detail::PlanJson const* p = j.get("plan");
        std::size_t device = 0;
        std::string precision;
        Plan& plan = e.learned.plan;
        if (p == nullptr || !size_of(p->get("micro_batch"), plan.micro_batch) ||
            !text_of(p->get("precision"), precision) || !size_of(p->get("precision_index"), plan.precision_index) ||
            !size_of(p->get("device"), device) || device > 1u << 20 || plan.micro_batch == 0)
            return (why = "the plan is missing or malformed"), false;
        plan.device = static_cast<int>(device);
        bool known = false;
        for (Precision q : {Precision::fp32, Precision::tf32, Precision::bf16, Precision::fp16, Precision::fp8})
            if (precision == to_string(q)) {
                plan.precision = q;
                known = true;
            }
        if (!known) return (why = "the plan's precision '" + precision + "' is unknown"), false;
        detail::PlanJson const* m = j.get("model");
        StepModel& model = e.learned.model;
        detail::PlanJson const* has_base = m != nullptr ? m->get("has_base") : nullptr;
        if (m == nullptr || !points_of(m->get("points"), model.points, StepModel::max_points, model.n_points) ||
            !points_of(m->get("bounds"), model.bounds, StepModel::max_bounds, model.n_bounds) ||
            !size_of(m->get("low"), model.low) || !size_of(m->get("high"), model.high) ||
            !size_of(m->get("base"), model.base) || !size_of(m->get("limit"), model.limit) ||
            has_base == nullptr || has_base->type != detail::PlanJson::Type::boolean)
            return (why = "the model is missing or malformed"), false;
        model.has_base = has_base->boolean;
        detail::PlanJson const* tail = j.get("tail");  // optional: absent in the first files written
        if (tail != nullptr && !size_of(tail, e.learned.tail)) return (why = "the tail is not a size"), false;
        detail::PlanJson const* release = j.get("release_before_batches");  // optional, as the tail
        if (release != nullptr && release->type != detail::PlanJson::Type::boolean)
            return (why = "release_before_batches is not true or false"), false;
        e.learned.release_before_batches = release != nullptr && release->boolean;
        return true;
    }

#if OOMGUARD_PLAN_CACHE_POSIX
    // An open descriptor, closed once.
    struct Fd {
        int fd = -1;
        ~Fd() {
            if (fd >= 0) ::close(fd);
        }
    };

    static std::string os_error(char const* what, std::string const& path) {
        return std::string(what) + " " + path + ": " + std::strerror(errno);
    }

    // The file's entries: none when it does not exist; false when it cannot be read or parsed.
    // `replaceable` (when given) says whether a file that failed to read may be
    // replaced at a save: a corrupt one may; another version's, or one that
    // could not be read (permissions, I/O), may not.
    bool read_file(std::vector<PlanCacheEntry>& entries, std::string& error, bool* replaceable = nullptr) const {
        entries.clear();
        if (replaceable != nullptr) *replaceable = false;
        Fd f;
        do f.fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
        while (f.fd < 0 && errno == EINTR);
        if (f.fd < 0) {
            if (errno == ENOENT) return true;
            error = os_error("cannot open", path_) + "; it is ignored";
            return false;
        }
        struct stat st;
        if (::fstat(f.fd, &st) != 0 || !S_ISREG(st.st_mode)) {
            error = "not a regular file; it is ignored";
            return false;
        }
        std::string text;
        char buf[4096];
        for (;;) {
            ssize_t const n = ::read(f.fd, buf, sizeof buf);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) {
                error = os_error("cannot read", path_) + "; it is ignored";
                return false;
            }
            if (n == 0) break;
            text.append(buf, static_cast<std::size_t>(n));
            if (text.size() > (std::size_t{16} << 20)) {
                error = "larger than 16 MiB: not a plan cache; it is ignored";
                return false;
            }
        }
        bool foreign = false;
        if (!from_json(text, entries, error, &foreign)) {
            if (replaceable != nullptr) *replaceable = !foreign;
            error += foreign ? "; it is ignored, and left as it is" : "; it is ignored and will be replaced at the next save";
            entries.clear();
            return false;
        }
        return true;
    }

    static bool write_all(int fd, std::string const& text) noexcept {
        std::size_t done = 0;
        while (done < text.size()) {
            ssize_t const n = ::write(fd, text.data() + done, text.size() - done);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) return false;
            done += static_cast<std::size_t>(n);
        }
        return true;
    }

    // Under an exclusive flock of "<path>.lock": what is on disk, with `entry`
    // put in (replacing the entry of its key), written to "<path>.tmp",
    // fsynced, renamed over the file, and the directory fsynced.
    bool write_entry(PlanCacheEntry const& entry, std::string& error) {
        std::string const lock_path = path_ + ".lock", tmp = path_ + ".tmp";
        Fd lock;
        do lock.fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        while (lock.fd < 0 && errno == EINTR);
        if (lock.fd < 0) {
            error = os_error("cannot save: cannot open the lock file", lock_path);
            return false;
        }
        // Another process saving holds it for milliseconds; one that holds it
        // longer (stopped, hung) must not stop training: 2 s, then no save.
        // Polled every millisecond, so that a process saving often does not
        // keep winning the lock between two polls of a slow one.
        int rc = 0;
        for (int tries = 0;; ++tries) {
            rc = ::flock(lock.fd, LOCK_EX | LOCK_NB);
            if (rc == 0 || (errno != EWOULDBLOCK && errno != EINTR) || tries >= 2000) break;
            ::usleep(1000);
        }
        if (rc != 0) {
            error = os_error("cannot save: cannot lock (held by another process for over 2 s?)", lock_path);
            return false;
        }
        std::vector<PlanCacheEntry> entries;
        std::string read_error;
        bool replaceable = true;
        if (!read_file(entries, read_error, &replaceable)) {
            if (!replaceable) {  // another version's cache, or a file we could not read: not ours to replace
                error = "cannot save: " + read_error;
                return false;
            }
            warn(read_error);  // corrupt: it is replaced by a valid one
            entries.clear();
        }
        bool replaced = false;
        for (auto& e : entries)
            if (e.same_key(entry)) {
                e = entry;
                replaced = true;
            }
        if (!replaced) entries.push_back(entry);
        std::string const text = to_json(entries);
        {
            Fd out;
            do out.fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
            while (out.fd < 0 && errno == EINTR);
            if (out.fd < 0) {
                error = os_error("cannot save: cannot create", tmp);
                return false;
            }
            if (!write_all(out.fd, text) || ::fsync(out.fd) != 0) {
                error = os_error("cannot save: cannot write", tmp);
                ::unlink(tmp.c_str());
                return false;
            }
        }
        if (::rename(tmp.c_str(), path_.c_str()) != 0) {
            error = os_error("cannot save: cannot replace", path_);
            ::unlink(tmp.c_str());
            return false;
        }
        std::size_t const slash = path_.rfind('/');
        std::string const dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path_.substr(0, slash);
        Fd d;
        d.fd = ::open(dir.c_str(), O_RDONLY | O_CLOEXEC);
        if (d.fd >= 0) (void)::fsync(d.fd);  // the rename itself durable; a failure here loses no data
        return true;
    }
#else
    bool read_file(std::vector<PlanCacheEntry>& entries, std::string& error) const {
        entries.clear();
        error = "plan caches need POSIX file locking; none is read on this system";
        return false;
    }
    bool write_entry(PlanCacheEntry const&, std::string& error) {
        error = "plan caches need POSIX file locking; none is written on this system";
        return false;
    }
#endif

    std::string path_;
    std::vector<std::string> warnings_;
};

}  // namespace oomguard
