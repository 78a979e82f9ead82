// A picture of a run: one self-contained SVG (valid XML, no script, no CSS,
// no external font or image) that any browser, image viewer or `rsvg-convert`
// shows. Opt-in; not in the umbrella header.
//
// Top panel, device memory over time: each micro-batch's peak and the bytes
// held between micro-batches, against the budget's cap and the device's
// capacity; every OOM a red cross at the demand that failed (held + request),
// those at setup too (Report::note_oom).
// Bottom panel: each workload's micro-batch size as a step line, dashed while
// it runs below its first precision, the precision named where it changes.
//
//   oomguard::Report report;  report.track("GPU 0", budget);  report.attach(train, "train");
//   ... train ...
//   std::string svg = oomguard::plot_svg(report);   // or plot_svg(report.timeline(), "title")
#pragma once

#include <oomguard/detail/utf8.hpp>
#include <oomguard/report.hpp>

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace oomguard {

namespace detail {

// Text as XML character data: markup escaped; control characters, which XML 1.0
// forbids even escaped, become '?', and each ill-formed UTF-8 sequence U+FFFD
// (as in the report's JSON).
inline std::string xml_text(std::string_view s) {
    std::string o;
    for_each_utf8(
        s,
        [&](char c) {
            switch (c) {
                case '&': o += "&amp;"; break;
                case '<': o += "&lt;"; break;
                case '>': o += "&gt;"; break;
                case '"': o += "&quot;"; break;
                case '\'': o += "&apos;"; break;
                default: o += static_cast<unsigned char>(c) >= 0x20 || c == '\t' || c == '\n' ? c : '?';
            }
        },
        [&](std::string_view t) { o.append(t.data(), t.size()); });
    return o;
}

// A round step for about `ticks` divisions of [0, hi]: 1, 2 or 5 times a power of ten.
inline double nice_step(double hi, int ticks) {
    if (!(hi > 0)) return 1;
    double raw = hi / ticks, p = std::pow(10.0, std::floor(std::log10(raw)));
    double f = raw / p;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p;
}

inline std::string fixed(double v, int decimals = 1) {
    char b[48];
    std::snprintf(b, sizeof b, "%.*f", decimals, v);
    return b;
}

}  // namespace detail

/// The timeline as an SVG document (`title` on top; empty: a default).
inline std::string plot_svg(Timeline const& t, std::string const& title = "") {
    using detail::fixed;
    using detail::xml_text;
    double const W = 960, H = 600, L = 90, R = 220, T = 56, mem_h = 300, gap = 56, plan_h = 140;
    double const x0 = L, x1 = W - R, my0 = T, my1 = T + mem_h, py0 = my1 + gap, py1 = py0 + plan_h;
    static char const* const workload_colors[] = {"#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"};

    double tmax = t.end;
    for (auto const& m : t.memory) tmax = m.t > tmax ? m.t : tmax;
    for (auto const& o : t.ooms) tmax = o.t > tmax ? o.t : tmax;
    if (!(tmax > 0)) tmax = 1e-3;
    // Seconds, milliseconds or microseconds: whichever keeps the tick labels short.
    double const tscale = tmax >= 2 ? 1 : tmax >= 2e-3 ? 1e3 : 1e6;
    char const* const tunit = tmax >= 2 ? "s" : tmax >= 2e-3 ? "ms" : "\xC2\xB5s";
    double const tstep = detail::nice_step(tmax * tscale, 8) / tscale;
    tmax = std::ceil(tmax / tstep) * tstep;

    double ymax = 0;
    for (auto const& d : t.devices) {
        ymax = d.capacity > ymax ? static_cast<double>(d.capacity) : ymax;
        ymax = d.limit > ymax ? static_cast<double>(d.limit) : ymax;
    }
    for (auto const& m : t.memory) ymax = static_cast<double>(m.peak) > ymax ? static_cast<double>(m.peak) : ymax;
    // A demand far above the device (a whole epoch asked for at once) would flatten
    // everything else: the axis stops at 1.5x the rest, and such OOMs sit on its top edge.
    double const others = ymax;
    for (auto const& o : t.ooms) {
        double d = static_cast<double>(o.demand);
        if (d > ymax) ymax = others > 0 && d > 1.5 * others ? 1.5 * others : d;
    }
    if (!(ymax > 0)) ymax = 1;
    struct Unit {
        char const* name;
        double bytes;
    };
    static Unit const units[] = {{"GiB", 1073741824.0}, {"MiB", 1048576.0}, {"KiB", 1024.0}, {"B", 1.0}};
    Unit unit = units[3];
    for (auto const& u : units)
        if (ymax >= 2 * u.bytes) {
            unit = u;
            break;
        }
    double const ystep = detail::nice_step(ymax * 1.05 / unit.bytes, 5) * unit.bytes;
    ymax = std::ceil(ymax * 1.05 / ystep) * ystep;

    std::size_t mmax = 1;
    for (auto const& m : t.memory) mmax = m.plan.micro_batch > mmax ? m.plan.micro_batch : mmax;
    double mstep = detail::nice_step(static_cast<double>(mmax) * 1.1, 4);
    if (mstep < 1) mstep = 1;  // sizes are whole samples
    double const mtop = std::ceil(static_cast<double>(mmax) * 1.1 / mstep) * mstep;

    auto X = [&](double s) { return x0 + (x1 - x0) * s / tmax; };
    auto Y = [&](double b) { return my1 - (my1 - my0) * (b > ymax ? ymax : b) / ymax; };
    auto PY = [&](double m) { return py1 - (py1 - py0) * m / mtop; };
    int decimals_t = tstep * tscale >= 1 ? 0 : tstep * tscale >= 0.1 ? 1 : 2;
    int decimals_y = ystep / unit.bytes >= 1 ? 0 : 1;

    std::string s;
    s += "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
    s += "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + fixed(W, 0) + "\" height=\"" + fixed(H, 0) +
         "\" viewBox=\"0 0 " + fixed(W, 0) + " " + fixed(H, 0) +
         "\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\" font-size=\"12\">\n";
    s += "<title>" + xml_text(title.empty() ? "oomguard: memory and plan over time" : title) + "</title>\n";
    s += "<rect x=\"0\" y=\"0\" width=\"" + fixed(W, 0) + "\" height=\"" + fixed(H, 0) + "\" fill=\"#ffffff\"/>\n";
    s += "<text x=\"" + fixed(L) + "\" y=\"28\" font-size=\"16\" font-weight=\"bold\">" +
         xml_text(title.empty() ? "oomguard: device memory and plan over time" : title) + "</text>\n";

    auto axes = [&](double top, double bottom, std::string const& ylabel) {
        s += "<rect x=\"" + fixed(x0) + "\" y=\"" + fixed(top) + "\" width=\"" + fixed(x1 - x0) + "\" height=\"" +
             fixed(bottom - top) + "\" fill=\"#fafafa\" stroke=\"#444444\"/>\n";
        s += "<text transform=\"translate(" + fixed(22) + " " + fixed((top + bottom) / 2) +
             ") rotate(-90)\" text-anchor=\"middle\">" + xml_text(ylabel) + "</text>\n";
        for (double v = 0; v <= tmax + tstep / 2; v += tstep) {
            s += "<line x1=\"" + fixed(X(v)) + "\" y1=\"" + fixed(bottom) + "\" x2=\"" + fixed(X(v)) + "\" y2=\"" +
                 fixed(bottom + 5) + "\" stroke=\"#444444\"/>\n";
            s += "<text x=\"" + fixed(X(v)) + "\" y=\"" + fixed(bottom + 18) + "\" text-anchor=\"middle\">" +
                 fixed(v * tscale, decimals_t) + "</text>\n";
        }
    };

    // Memory panel.
    axes(my0, my1, std::string("device memory (") + unit.name + ")");
    for (double v = 0; v <= ymax + ystep / 2; v += ystep) {
        s += "<line x1=\"" + fixed(x0) + "\" y1=\"" + fixed(Y(v)) + "\" x2=\"" + fixed(x1) + "\" y2=\"" + fixed(Y(v)) +
             "\" stroke=\"#e0e0e0\"/>\n";
        s += "<text x=\"" + fixed(x0 - 6) + "\" y=\"" + fixed(Y(v) + 4) + "\" text-anchor=\"end\">" +
             fixed(v / unit.bytes, decimals_y) + "</text>\n";
    }
    // The capacity's and the cap's lines are named in the right margin, at their
    // height: inside the panel a label sat on the peaks, which run up to the cap.
    struct LineLabel {
        double y;
        char const* color;
        std::string text;
    };
    std::vector<LineLabel> line_labels;
    auto hline = [&](double bytes, char const* color, char const* dash, std::string const& label) {
        s += "<line x1=\"" + fixed(x0) + "\" y1=\"" + fixed(Y(bytes)) + "\" x2=\"" + fixed(x1) + "\" y2=\"" +
             fixed(Y(bytes)) + "\" stroke=\"" + color + "\" stroke-width=\"2\" stroke-dasharray=\"" + dash + "\"/>\n";
        line_labels.push_back(LineLabel{Y(bytes) + 4, color, label});
    };
    for (auto const& d : t.devices) {
        if (d.capacity != 0) hline(static_cast<double>(d.capacity), "#555555", "8 4", d.label + " capacity");
        if (d.limit != 0 && d.limit != d.capacity)
            hline(static_cast<double>(d.limit), "#ff7f0e", "4 3", d.label + " budget cap");
    }
    double const label_gap = 14;  // a line of 12-pixel text
    for (std::size_t i = 1; i < line_labels.size(); ++i)  // top to bottom, each a line below the one above
        for (std::size_t k = i; k > 0 && line_labels[k].y < line_labels[k - 1].y; --k)
            std::swap(line_labels[k], line_labels[k - 1]);
    for (std::size_t i = 1; i < line_labels.size(); ++i)
        if (line_labels[i].y < line_labels[i - 1].y + label_gap) line_labels[i].y = line_labels[i - 1].y + label_gap;
    for (auto const& l : line_labels)
        s += "<text x=\"" + fixed(x1 + 6) + "\" y=\"" + fixed(l.y) + "\" fill=\"" + l.color + "\">" + xml_text(l.text) +
             "</text>\n";
    auto series = [&](bool peak, char const* color, double width) {
        for (auto const& d : t.devices) {
            std::string pts;
            for (auto const& m : t.memory)
                if (m.device == d.device)
                    pts += fixed(X(m.t)) + "," + fixed(Y(static_cast<double>(peak ? m.peak : m.held))) + " ";
            if (!pts.empty())
                s += "<polyline points=\"" + pts + "\" fill=\"none\" stroke=\"" + color + "\" stroke-width=\"" +
                     fixed(width) + "\" stroke-linejoin=\"round\"/>\n";
            if (pts.find(' ') == pts.size() - 1)  // one point draws no line: a dot
                for (auto const& m : t.memory)
                    if (m.device == d.device)
                        s += "<circle cx=\"" + fixed(X(m.t)) + "\" cy=\"" +
                             fixed(Y(static_cast<double>(peak ? m.peak : m.held))) + "\" r=\"3\" fill=\"" + color +
                             "\"/>\n";
        }
    };
    series(false, "#7f7f7f", 1.5);
    series(true, "#1f77b4", 1.5);
    double last_label_x = -1e9, label_dy = 0;
    for (auto const& o : t.ooms) {
        double cx = X(o.t), cy = o.demand != 0 ? Y(static_cast<double>(o.demand)) : my0 + 8;
        if (o.demand != 0 && static_cast<double>(o.demand) > ymax) {  // off the scale: say how far
            cy = my0 + 8;
            label_dy = cx - last_label_x < 70 ? label_dy + 14 : 0;  // labels close together step down
            last_label_x = cx;
            s += "<text x=\"" + fixed(cx + 8) + "\" y=\"" + fixed(cy + 4 + label_dy) + "\" fill=\"#d62728\">" +
                 xml_text(format_bytes(o.demand).c_str()) + "</text>\n";
        }
        s += "<path d=\"M" + fixed(cx - 5) + " " + fixed(cy - 5) + " L" + fixed(cx + 5) + " " + fixed(cy + 5) + " M" +
             fixed(cx - 5) + " " + fixed(cy + 5) + " L" + fixed(cx + 5) + " " + fixed(cy - 5) +
             "\" stroke=\"#d62728\" stroke-width=\"2.5\"/>\n";
    }

    // Plan panel.
    axes(py0, py1, "micro-batch size");
    for (double v = 0; v <= mtop + mstep / 2; v += mstep) {
        s += "<line x1=\"" + fixed(x0) + "\" y1=\"" + fixed(PY(v)) + "\" x2=\"" + fixed(x1) + "\" y2=\"" + fixed(PY(v)) +
             "\" stroke=\"#e0e0e0\"/>\n";
        s += "<text x=\"" + fixed(x0 - 6) + "\" y=\"" + fixed(PY(v) + 4) + "\" text-anchor=\"end\">" + fixed(v, 0) +
             "</text>\n";
    }
    s += "<text x=\"" + fixed((x0 + x1) / 2) + "\" y=\"" + fixed(py1 + 36) + "\" text-anchor=\"middle\">time (" + tunit + ")</text>\n";
    // Each workload's planned micro-batch size while it runs: a step line through its
    // micro-batches, broken where another workload ran in between.
    for (std::size_t w = 0; w < t.workloads.size(); ++w) {
        char const* color = workload_colors[w % (sizeof workload_colors / sizeof *workload_colors)];
        Plan first{}, last{};
        bool have = false, open = false;
        for (auto const& p : t.plans)  // the plan it started with: dashed below its precision
            if (p.workload == w) {
                first = p.plan;
                break;
            }
        std::string d;
        auto flush = [&](Plan const& p) {
            if (d.empty()) return;
            s += "<path d=\"" + d + "\" stroke=\"" + color + "\" stroke-width=\"2.5\" fill=\"none\"" +
                 (p.precision != first.precision ? " stroke-dasharray=\"6 3\"" : "") + "/>\n";
            d.clear();
        };
        for (auto const& m : t.memory) {
            if (m.workload != w) {
                if (open) flush(last);
                open = false;
                continue;
            }
            double x = X(m.t), y = PY(static_cast<double>(m.plan.micro_batch));
            bool relabel = !have || m.plan.precision != last.precision;
            if (open && m.plan.precision != last.precision) {  // a new dash style from here
                d += " H" + fixed(x);
                flush(last);
                open = false;
            }
            if (!open) {
                d = "M" + fixed(x) + " " + fixed(y) + " h2";  // a lone micro-batch still shows
            } else {
                d += " H" + fixed(x) + " V" + fixed(y);
            }
            if (relabel)
                s += "<text x=\"" + fixed(x + 4) + "\" y=\"" + fixed(y - 6) + "\" fill=\"" + color + "\">" +
                     to_string(m.plan.precision) + "</text>\n";
            open = true;
            have = true;
            last = m.plan;
        }
        if (open) flush(last);
    }

    // Legend: the memory panel's keys (five lines of 20 pixels) where no line's label is.
    double const keys_h = 5 * 20;
    double ly = my0 + 6, lx = x1 + 16;
    auto clear_of_labels = [&](double top) {
        for (auto const& l : line_labels)
            if (l.y > top - 12 && l.y - 12 < top + keys_h - 6) return false;
        return true;
    };
    if (!clear_of_labels(ly))
        for (auto const& l : line_labels)
            if (l.y + 14 + keys_h <= my1 + 20 && clear_of_labels(l.y + 14)) {
                ly = l.y + 14;
                break;
            }
    auto key = [&](std::string const& line_attrs, std::string const& label) {
        s += "<line x1=\"" + fixed(lx) + "\" y1=\"" + fixed(ly) + "\" x2=\"" + fixed(lx + 26) + "\" y2=\"" + fixed(ly) +
             "\" " + line_attrs + "/>\n";
        s += "<text x=\"" + fixed(lx + 32) + "\" y=\"" + fixed(ly + 4) + "\">" + xml_text(label) + "</text>\n";
        ly += 20;
    };
    key("stroke=\"#1f77b4\" stroke-width=\"2\"", "micro-batch peak");
    key("stroke=\"#7f7f7f\" stroke-width=\"2\"", "held between steps");
    key("stroke=\"#ff7f0e\" stroke-width=\"2\" stroke-dasharray=\"4 3\"", "budget cap");
    key("stroke=\"#555555\" stroke-width=\"2\" stroke-dasharray=\"8 4\"", "device capacity");
    s += "<path d=\"M" + fixed(lx + 8) + " " + fixed(ly - 5) + " L" + fixed(lx + 18) + " " + fixed(ly + 5) + " M" +
         fixed(lx + 8) + " " + fixed(ly + 5) + " L" + fixed(lx + 18) + " " + fixed(ly - 5) +
         "\" stroke=\"#d62728\" stroke-width=\"2.5\"/>\n";
    s += "<text x=\"" + fixed(lx + 32) + "\" y=\"" + fixed(ly + 4) + "\">OOM (" + std::to_string(t.ooms.size()) +
         "), at its demand</text>\n";
    ly = py0 + 6;
    std::size_t const colors = sizeof workload_colors / sizeof *workload_colors, shown = t.workloads.size() < 5 ? t.workloads.size() : 5;
    for (std::size_t w = 0; w < shown; ++w)
        key(std::string("stroke=\"") + workload_colors[w % colors] + "\" stroke-width=\"2.5\"",
            t.workloads[w] + " micro-batch");
    if (t.workloads.size() > shown) {  // the legend has room for five
        s += "<text x=\"" + fixed(lx + 32) + "\" y=\"" + fixed(ly + 4) + "\">and " +
             std::to_string(t.workloads.size() - shown) + " more workloads</text>\n";
        ly += 20;
    }
    key("stroke=\"#444444\" stroke-width=\"2\" stroke-dasharray=\"6 3\"", "lower precision");
    if (t.memory.empty() && t.plans.empty())
        s += "<text x=\"" + fixed((x0 + x1) / 2) + "\" y=\"" + fixed((my0 + my1) / 2) +
             "\" text-anchor=\"middle\" fill=\"#888888\">no micro-batch ran yet</text>\n";
    s += "</svg>\n";
    return s;
}

/// The report's timeline so far as an SVG document.
inline std::string plot_svg(Report const& report, std::string const& title = "") {
    return plot_svg(report.timeline(), title);
}

}  // namespace oomguard
