"""Compile AITER's generated dispatch (or an ``aiter-blob`` module's) with g++ against small stub headers and
evaluate it over a grid, to check jitkiln's Python reading of it against the C++ itself.

The stubs replace AITER's ``gemm_moe_ck2stages.h`` (which needs HIP, CK and torch) with just what the dispatch
and lookup headers use: distinct element types of the right byte size, ``dtype_checker``, ``QuantType``, the
pipeline versions, ``TORCH_CHECK`` (throws) and ``ck_moe_stage{1,2}_gemm<...>`` as functions that describe
their own template arguments. Each call prints the lookup-table name of the instance the dispatch returns,
or the template arguments when no instance of the module has them, or the TORCH_CHECK message.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable

from jitkiln.errors import ToolchainNotFound
from jitkiln.families.ck2stages.cdispatch import SIZEOF
from jitkiln.families.ck2stages.module import AiterModule as Module

_STUB = r"""#pragma once
// jitkiln test stub standing in for AITER's gemm_moe_ck2stages.h (no HIP, CK or torch needed)
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>
#ifndef __Float4_e2m1fn_x2
#define __Float4_e2m1fn_x2 1
#endif
namespace at { using ScalarType = int; }
template <class T> struct jk_type;
#define JK_TYPE(T, CODE, SIZE) struct T { char b[SIZE]; }; \
    template <> struct jk_type<T> { static constexpr int code = CODE; static constexpr const char* name = #T; };
@TYPES@
template <class T> struct dtype_checker { bool operator()(at::ScalarType t) const { return t == jk_type<T>::code; } };
enum class QuantType : int { @QUANT@ };
enum class PipelineVersion : int { v1 = 1, v2 = 2, v3 = 3, v4 = 4, v5 = 5 };
constexpr PipelineVersion V1 = PipelineVersion::v1, V2 = PipelineVersion::v2, V3 = PipelineVersion::v3,
                          V4 = PipelineVersion::v4, V5 = PipelineVersion::v5;
using MoeKernel = const char* (*)();
template <class V> long long jk_val(V v) { return static_cast<long long>(v); }
@KERNELS@
inline void jk_cat(std::ostringstream&) {}
template <class T, class... R> void jk_cat(std::ostringstream& o, const T& t, const R&... r) { o << t; jk_cat(o, r...); }
#define TORCH_CHECK(cond, ...) do { if (!(cond)) { std::ostringstream jk_o; jk_cat(jk_o, __VA_ARGS__); \
    throw std::runtime_error(jk_o.str()); } } while (0)
"""

_MAIN = r"""
#include "gemm_moe_ck2stages_lookup.h"
#include "ck2stages_moe_stage1_heuristic_dispatch.hpp"
#include "ck2stages_moe_stage2_heuristic_dispatch.hpp"
#include <cstdio>
static std::vector<std::pair<std::string, MoeKernel>> jk_table = GENERATE_LOOKUP_TABLE();
static void jk_report(int stage, int bm, int id, MoeKernel k)
{
    for (auto& e : jk_table)
        if (e.second == k) { std::printf("%d %d %d NAME %s\n", stage, bm, id, e.first.c_str()); return; }
    std::printf("%d %d %d TEMPLATE %s\n", stage, bm, id, k());
}
int main()
{
    const int bms[] = {@BMS@};
    const int ids[] = {@IDS@};
    for (int stage = 1; stage <= 2; ++stage)
        for (int bm : bms)
            for (int id : ids)
            {
                int block_m = bm, inter_dim = id;
                (void)inter_dim;
                try
                {
                    MoeKernel k = stage == 1 ? moe_stage1_heuristic_dispatch(@ARGS1@)
                                             : moe_stage2_heuristic_dispatch(@ARGS2@);
                    jk_report(stage, bm, id, k);
                }
                catch (const std::exception& e)
                {
                    std::string m = e.what();
                    for (auto& c : m) if (c == '\n') c = ' ';
                    std::printf("%d %d %d ERROR %s\n", stage, bm, id, m.c_str());
                }
            }
}
"""


def template_params(mod: Module, stage: int) -> list[tuple[str, str]]:
    """(kind, name) of ``ck_moe_stage{stage}_gemm``'s template parameters, read from the tree's header."""
    hdr = (mod.tree.codegen / "gemm_moe_ck2stages.h").read_text()
    m = re.search(rf"template\s*<([^>]*)>\s*void\s+ck_moe_stage{stage}_gemm\s*\(", hdr)
    if not m:
        raise RuntimeError(f"no template declaration of ck_moe_stage{stage}_gemm in {mod.tree.codegen}")
    out = []
    for part in m.group(1).split(","):
        kind, name = " ".join(part.split()).rsplit(" ", 1)
        out.append(({"ck::index_t": "int", "index_t": "int", "class": "typename"}.get(kind, kind), name))
    return out


def _kernel_stubs(mod: Module) -> str:
    out = []
    for stage in (1, 2):
        params = template_params(mod, stage)
        decl = ", ".join(f"{k} P{i}" for i, (k, _) in enumerate(params))
        parts = " + ".join(f'"|" + std::string(jk_type<P{i}>::name)' if k == "typename"
                           else f'"|" + std::to_string(jk_val(P{i}))' for i, (k, _) in enumerate(params))
        out.append(f"template <{decl}>\nconst char* ck_moe_stage{stage}_gemm()\n"
                   f"{{ static const std::string s = std::string(\"{stage}\") + {parts}; return s.c_str(); }}")
    return "\n".join(out)


def _type_names(mod: Module, texts: Iterable[str]) -> list[str]:
    names = set(SIZEOF)
    for t in texts:
        for m in re.finditer(r"ck_moe_stage\d_gemm<\s*(\w+),\s*(\w+),\s*(\w+),\s*(\w+),\s*(\w+)", t):
            names.update(m.groups())
        names.update(re.findall(r"dtype_checker<(\w+)>", t))
    return sorted(n for n in names if not n.startswith("{"))


def _call_args(mod: Module, stage: int) -> str:
    vals = mod.variant.dispatch_values(stage)
    out = []
    for typ, name in mod.dispatch[stage].params:
        if name in ("block_m", "inter_dim"):
            out.append(name)
        elif "ScalarType" in typ:
            out.append(f"jk_type<{vals[name]}>::code")
        else:
            out.append(str(int(vals[name])))
    return ", ".join(out)


def default_grid(mod: Module) -> tuple[list[int], list[int]]:
    bms = {0, 1, 16, 32, 48, 64, 96, 128, 256, 512}
    ids = {1, 64, 128, 192, 255, 256, 257, 384, 512, 1024, 2048, 7168}
    for s in (1, 2):
        bms.update(mod.block_ms(s))
        for lo, hi in mod.inter_dim_regions(s):
            ids.add(lo)
            if hi is not None:
                ids.add(hi)
    return sorted(bms), sorted(ids)


def run_cxx(mod: Module, blob_dir: Path | None = None, grid: tuple[list[int], list[int]] | None = None,
            compiler: str | None = None) -> dict[tuple[int, int, int], tuple[str, str]]:
    """Compile the dispatch of ``blob_dir`` (default: AITER's own, as generated) and run it over ``grid``.

    Returns ``{(stage, block_m, inter_dim): (kind, text)}`` with kind NAME, TEMPLATE or ERROR."""
    cxx = compiler or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise ToolchainNotFound("no host C++ compiler (g++) to check the dispatch with",
                                hint="install g++ (apt install g++)")
    bms, ids = grid or default_grid(mod)
    with tempfile.TemporaryDirectory(prefix="jitkiln-ck2-cxx-") as d:
        d = Path(d)
        src_dir = d / "blob"
        if blob_dir is None:
            src_dir.mkdir()
            (src_dir / "gemm_moe_ck2stages_lookup.h").write_text(mod.blob.lookup)
            for s in (1, 2):
                (src_dir / f"ck2stages_moe_stage{s}_heuristic_dispatch.hpp").write_text(mod.blob.dispatch[s])
        else:
            src_dir = Path(blob_dir)
        texts = [p.read_text() for p in src_dir.glob("*.h*")]
        types = _type_names(mod, texts + [mod.blob.lookup])
        decl = "\n".join(f"JK_TYPE({t}, {i + 1}, {SIZEOF.get(t, 1)})" for i, t in enumerate(types))
        quant = ", ".join(f"{k.split('::')[1]} = {v}" for k, v in sorted(mod.enums.items(), key=lambda kv: kv[1]))
        stub = d / "stub"
        stub.mkdir()
        (stub / "gemm_moe_ck2stages.h").write_text(_STUB.replace("@TYPES@", decl).replace("@QUANT@", quant)
                                             .replace("@KERNELS@", _kernel_stubs(mod)))
        main = (_MAIN.replace("@BMS@", ", ".join(map(str, bms))).replace("@IDS@", ", ".join(map(str, ids)))
                .replace("@ARGS1@", _call_args(mod, 1)).replace("@ARGS2@", _call_args(mod, 2)))
        (d / "main.cpp").write_text(main)
        exe = d / "dispatch"
        p = subprocess.run([cxx, "-std=c++17", "-O0", "-w", "-I", str(stub), "-I", str(src_dir), str(d / "main.cpp"),
                            "-o", str(exe)], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"g++ rejected the dispatch harness:\n{p.stderr[-3000:]}")
        r = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    out = {}
    for line in r.stdout.splitlines():
        st, bm, idim, kind, text = line.split(" ", 4)
        out[(int(st), int(bm), int(idim))] = (kind, text)
    return out


def python_view(mod: Module, stage: int, bm: int, idim: int) -> tuple[str, str]:
    """jitkiln's evaluation of the same call, in the harness's terms."""
    p = mod.pick(stage, bm, idim)
    if p.instance is not None:
        return ("NAME", p.instance.kernel)
    if p.targs:
        return ("TEMPLATE", "|".join((str(stage),) + tuple(p.targs)))
    return ("ERROR", p.error)
