#!/usr/bin/env python3
"""Checks that a PNG (as rsvg-convert writes it: 8-bit RGB or RGBA) is a picture,
not a blank page: decodes it with the standard library alone and requires that
at least MIN_INK of its pixels differ from the background (the most common
colour) and that it holds at least MIN_COLOURS distinct colours.
Each further RRGGBB:N argument requires at least N pixels within a small
distance of that colour (a series or marker drawn, not just the frame).
Usage: png_check.py FILE.png [MIN_INK=0.02] [MIN_COLOURS=6] [RRGGBB:N ...]"""
import struct
import sys
import zlib


def decode(path):
    data = open(path, "rb").read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        sys.exit(f"{path}: not a PNG")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in (2, 6) or interlace != 0:
        sys.exit(f"{path}: only 8-bit RGB/RGBA, non-interlaced PNGs are read here")
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev, at = [], bytearray(stride), 0
    for _ in range(height):
        f, line = raw[at], bytearray(raw[at + 1:at + 1 + stride])
        at += 1 + stride
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, bpp, rows


def main():
    path = sys.argv[1]
    min_ink = float(sys.argv[2]) if len(sys.argv) > 2 else 0.02
    min_colours = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    width, height, bpp, rows = decode(path)
    counts = {}
    for row in rows:
        for i in range(0, len(row), bpp):
            px = row[i:i + bpp]
            counts[px] = counts.get(px, 0) + 1
    background, most = max(counts.items(), key=lambda kv: kv[1])
    ink = 1 - most / (width * height)
    print(f"{path}: {width}x{height}, {len(counts)} colours, {ink:.1%} of the pixels drawn on the background")
    if ink < min_ink or len(counts) < min_colours:
        sys.exit(f"{path}: looks blank (need {min_ink:.0%} drawn and {min_colours} colours)")
    for spec in sys.argv[4:]:
        hexa, need = spec.split(":")
        want = tuple(int(hexa[i:i + 2], 16) for i in (0, 2, 4))
        have = sum(n for px, n in counts.items() if sum(abs(px[i] - want[i]) for i in range(3)) <= 60)
        print(f"{path}: {have} pixels of #{hexa} (need {need})")
        if have < int(need):
            sys.exit(f"{path}: too little #{hexa}: {have} pixels, need {need}")


main()
