#!/usr/bin/env python3
"""What a GGUF file holds and what a decode step reads of it (standard library only).

    bench/gguf_info.py MODEL.gguf [--json]

Reads only the header (metadata and tensor table). Prints the tensors' block
types, the file size, and the weight bytes read per generated token: every
linear layer once (the output matrix included; the embedding is one row per
token, so only where it is tied does it count, as the output matrix), and of a
mixture of experts' stacked expert tensors (`ffn_*_exps`) only the active
experts' share, `expert_used_count / expert_count`. With --json, one JSON object.
"""
import json
import os
import struct
import sys

# ggml type id: (name, values per block, bytes per block)
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 30: ("BF16", 1, 2),
}

# GGUF metadata value types: struct format of the scalars (8: string, 9: array).
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}


class GgufError(Exception):
    """A file that is not a GGUF this reader understands."""


def _read_header(f):
    def read(fmt):
        n = struct.calcsize(fmt)
        b = f.read(n)
        if len(b) != n:
            raise GgufError("truncated header")
        return struct.unpack(fmt, b)[0]

    def string():
        n = read("<Q")
        return f.read(n).decode("utf-8", "replace")

    def value(t, keep=True):
        if t in _SCALAR:
            return read(_SCALAR[t])
        if t == 8:
            return string()
        if t == 9:
            et, n = read("<I"), read("<Q")
            if not keep or n > 64:
                # Long arrays (the vocabulary) are skipped, only counted.
                if et in _SCALAR:
                    f.seek(n * struct.calcsize(_SCALAR[et]), os.SEEK_CUR)
                else:
                    for _ in range(n):
                        value(et, False)
                return f"<array of {n}>"
            return [value(et) for _ in range(n)]
        raise GgufError(f"unknown metadata value type {t}")

    if f.read(4) != b"GGUF":
        raise GgufError("not a GGUF file (no GGUF magic)")
    version = read("<I")
    if version not in (2, 3):
        raise GgufError(f"GGUF version {version} (this reader knows 2 and 3)")
    n_tensors, n_kv = read("<Q"), read("<Q")
    meta = {}
    for _ in range(n_kv):
        k = string()
        meta[k] = value(read("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = string()
        nd = read("<I")
        dims = [read("<Q") for _ in range(nd)]
        t = read("<I")
        off = read("<Q")
        if t not in GGML_TYPES:
            raise GgufError(f"{name}: unknown ggml type {t}")
        tname, bs, bb = GGML_TYPES[t]
        n = 1
        for d in dims:
            n *= d
        tensors.append({"name": name, "dims": dims, "type": tname, "offset": off,
                        "bytes": n // bs * bb})
    return meta, tensors


def read_gguf(path):
    """(metadata, tensors) of a GGUF file; long arrays are left as a count."""
    with open(path, "rb") as f:
        return _read_header(f)


def bytes_per_token(meta, tensors):
    """(weight bytes read per token, of which expert bytes, all expert bytes)."""
    arch = meta.get("general.architecture", "llama")
    n_exp = meta.get(f"{arch}.expert_count") or 0
    used = meta.get(f"{arch}.expert_used_count") or 0
    names = {t["name"] for t in tensors}
    total, expert_read, expert_all = 0, 0, 0
    for t in tensors:
        name = t["name"]
        if len(t["dims"]) < 2:
            continue  # norms and other vectors: negligible, and not weights of a product
        if name == "token_embd.weight" and "output.weight" in names:
            continue  # one row per token
        if "_exps." in name and n_exp:
            share = t["bytes"] * used // n_exp
            expert_read += share
            expert_all += t["bytes"]
            total += share
        else:
            total += t["bytes"]
    return total, expert_read, expert_all


def main():
    args = [a for a in sys.argv[1:] if a != "--json"]
    if len(args) != 1:
        sys.exit(f"usage: {sys.argv[0]} MODEL.gguf [--json]")
    path = args[0]
    try:
        meta, tensors = read_gguf(path)
    except (OSError, GgufError) as e:
        sys.exit(f"gguf_info: {path}: {e}")
    bpt, exp_read, exp_all = bytes_per_token(meta, tensors)
    types = {}
    for t in tensors:
        types[t["type"]] = types.get(t["type"], 0) + t["bytes"]
    arch = meta.get("general.architecture", "?")
    info = {
        "file": path,
        "file_bytes": os.path.getsize(path),
        "architecture": arch,
        "layers": meta.get(f"{arch}.block_count"),
        "hidden": meta.get(f"{arch}.embedding_length"),
        "expert_count": meta.get(f"{arch}.expert_count"),
        "expert_used_count": meta.get(f"{arch}.expert_used_count"),
        "tensors": len(tensors),
        "bytes_by_type": types,
        "weight_bytes_per_token": bpt,
        "expert_bytes_per_token": exp_read,
        "expert_bytes_total": exp_all,
    }
    if "--json" in sys.argv[1:]:
        print(json.dumps(info))
        return
    print(f"{path}: {arch}, {info['layers']} layers, hidden {info['hidden']}, "
          f"{len(tensors)} tensors, {info['file_bytes'] / 2**20:.0f} MiB")
    for k, v in sorted(types.items(), key=lambda kv: -kv[1]):
        print(f"  {k:6} {v / 2**20:10.1f} MiB")
    print(f"weight bytes per token: {bpt / 1e6:.1f} MB")
    if exp_all:
        print(f"  of which experts: {exp_read / 1e6:.1f} MB "
              f"({info['expert_used_count']} of {info['expert_count']} experts; all experts "
              f"{exp_all / 1e6:.1f} MB, non-expert {(bpt - exp_read) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
