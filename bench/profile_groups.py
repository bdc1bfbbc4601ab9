#!/usr/bin/env python3
"""Groups a `perf script` call-graph dump by component (bench/profile.sh, issue 10).

Reads `perf script -F comm,ip,sym,dso` output (samples separated by blank lines, the first frame
the leaf) on stdin and prints Markdown: the share of all samples spent in the kernel and in
user space, then user space by component, self (the leaf frame's component) and children (any
frame of the stack in that component; a stack counts once per component), then the top user
space symbols by self time. Needs call graphs that walk Rust frames: `perf record
--call-graph dwarf` (keygate is built without frame pointers).
"""
import re
import sys
from collections import Counter

# First match wins; the leaf's symbol (demangled Rust path) and its object decide.
GROUPS = [
    ("allocator (jemalloc)", r"^(_rjem_|je_|tikv_jemalloc|__rust_alloc|__rust_dealloc|__rust_realloc|__rdl_|alloc::alloc::|<alloc::raw_vec|alloc::raw_vec)"),
    ("memcpy/memcmp (libc)", r"^__(mem|str)\w*"),
    ("crypto (aws-lc/ring)", r"^(aws_lc|ring_core|ring::|aws_lc_rs|GFp_|gcm_|aes_|_aesni|aesni_|ChaCha|chacha|poly1305|sha256_block|x25519|ecp_nistz|p256_|bn_|BN_|EC_|ECDSA|fiat_)"),
    ("rustls", r"rustls::"),
    ("hyper h2 (h2 crate, hyper::proto::h2)", r"(^|[<\s])h2::|hyper::proto::h2|hyper::server::conn::http2|hyper::client::conn::http2"),
    ("hyper h1 (hyper::proto::h1)", r"hyper::proto::h1|hyper::server::conn::http1|hyper::client::conn::http1|hyper::client::dispatch|httparse::"),
    ("hyper (other)", r"hyper::|hyper_util::"),
    ("http (header map, uri)", r"(^|[<\s])http::"),
    ("tracing / logging", r"tracing|keygate::log::|serde_json"),
    ("keygate: forward (upstream pool, header rewriting)", r"keygate::forward|keygate::proto::"),
    ("keygate: body / server / stall", r"keygate::body|keygate::server|keygate::stall|keygate::conn_limits"),
    ("keygate: pipeline (checks, auth)", r"keygate::"),
    ("tokio", r"tokio::"),
    ("bytes", r"(^|[<\s])bytes::"),
    ("std / core", r"(^|[<\s])(std|core|alloc)::"),
]
COMPILED = [(name, re.compile(rx)) for name, rx in GROUPS]


def group(sym, dso):
    if dso.startswith("[kernel") or sym.startswith("[k]"):
        return "kernel"
    for name, rx in COMPILED:
        if rx.search(sym):
            return name
    if "libc" in dso:
        return "libc (other)"
    if "vdso" in dso:
        return "vdso (clock_gettime)"
    return "other user space"


# Frames skipped when naming an allocation's site: the allocator and std's containers.
PLUMBING = re.compile(r"^(_rjem_|je_|__rust_|__rdl_|__mem|__GI_|alloc::|<alloc::|core::|<core::|std::|<std::|hashbrown::|\[unknown\])")


def sites(per_request):
    """`--sites PER_REQUEST`: stacks of allocator probe hits (perf record -e probe...
    --call-graph dwarf); prints each call site's share (three meaningful frames) as
    allocations per request, given the measured total PER_REQUEST (perf drops samples when
    its buffer overflows, so the samples give shares, not counts)."""
    counts = Counter()
    total = 0
    stack = []

    def flush():
        nonlocal total
        if not stack:
            return
        total += 1
        frames = [f for f in stack if not PLUMBING.search(f)]
        counts[" <- ".join(f[:90] for f in frames[:3])] += 1
        stack.clear()

    frame = re.compile(r"^\s+[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$")
    for line in sys.stdin:
        if not line.strip():
            flush()
            continue
        m = frame.match(line)
        if m:
            stack.append(re.sub(r"\+0x[0-9a-f]+$", "", m.group(1)))
    flush()
    if not total:
        print("(no samples)")
        return
    print(f"{total} allocations sampled; {per_request:.1f} per request in all.")
    print()
    print("| per request | site (innermost first) |")
    print("| ---: | --- |")
    for site, n in counts.most_common(40):
        share = per_request * n / total
        if share < 0.05:
            break
        print(f"| {share:.2f} | `{site}` |")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--sites":
        return sites(float(sys.argv[2]))
    total = 0
    self_c = Counter()
    child_c = Counter()
    sym_self = Counter()
    # For leaf frames in libc's memcpy/memcmp and the allocator: who called them.
    callers = Counter()
    stack = []

    def flush():
        nonlocal total
        if not stack:
            return
        total += 1
        leaf_sym, leaf_dso = stack[0]
        g = group(leaf_sym, leaf_dso)
        self_c[g] += 1
        if g != "kernel":
            sym_self[leaf_sym[:110]] += 1
        if g in ("memcpy/memcmp (libc)", "allocator (jemalloc)"):
            caller = next((s for s, _ in stack[1:] if not PLUMBING.search(s)), "?")
            callers[(leaf_sym[:40], caller[:110])] += 1
        seen = set()
        for sym, dso in stack:
            gg = group(sym, dso)
            if gg not in seen:
                seen.add(gg)
                child_c[gg] += 1
        stack.clear()

    frame = re.compile(r"^\s+[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$")
    for line in sys.stdin:
        if not line.strip():
            flush()
            continue
        m = frame.match(line)
        if m:
            sym = re.sub(r"\+0x[0-9a-f]+$", "", m.group(1))
            if sym != "[unknown]":
                stack.append((sym, m.group(2)))
    flush()
    if not total:
        print("(no samples)")
        return
    user = total - self_c["kernel"]
    print(f"Samples: {total}; kernel (self) {100 * self_c['kernel'] / total:.1f} %, "
          f"user space (self) {100 * user / total:.1f} %.")
    print()
    print("| component | self, % of user space | self, % of all | children, % of all |")
    print("| --- | ---: | ---: | ---: |")
    for g, n in self_c.most_common():
        if g == "kernel":
            continue
        print(f"| {g} | {100 * n / max(user, 1):.1f} | {100 * n / total:.1f} | {100 * child_c[g] / total:.1f} |")
    print()
    print("Top user-space symbols (self, % of user space):")
    print()
    print("```")
    for s, n in sym_self.most_common(30):
        print(f"{100 * n / max(user, 1):5.1f}%  {s}")
    print("```")
    print()
    print("Callers of memcpy/memcmp and the allocator (self, % of user space):")
    print()
    print("```")
    for (leaf, caller), n in callers.most_common(15):
        print(f"{100 * n / max(user, 1):5.1f}%  {leaf} <- {caller}")
    print("```")


if __name__ == "__main__":
    main()
