"""Read AITER's generated C++ (heuristic dispatch and lookup table) into Python.

The generated ``ck2stages_moe_stage{1,2}_heuristic_dispatch.hpp`` is plain C++: nested ``if``/``else`` over
dtypes, ``inter_dim`` and ``block_m`` that ``return`` a template instantiation or ``TORCH_CHECK(false, ...)``.
This module parses that small subset of C++ into a tree and evaluates it in Python, so jitkiln's dispatch is
AITER's dispatch for whichever AITER tree is given (``tests/test_ck2stages_dispatch.py`` proves the Python
evaluation equal to the same header compiled by g++). Anything outside the subset is refused with a clear error,
never guessed.

Longer than 400 lines: a small C++ subset parser and evaluator, one job.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from ...errors import JitkilnError

# Byte sizes of CK's element types (ck::f4x2_pk_t and ck::pk_i4_t pack two values in one byte).
SIZEOF = {"FP4X2": 1, "F8": 1, "I8": 1, "I4": 1, "B16": 2, "F16": 2, "F32": 4, "I32": 4}
DEFINES = frozenset({"__Float4_e2m1fn_x2"})  # ROCm >= 6.4 headers define it; AITER guards fp4 code with it


class DispatchParseError(JitkilnError):
    pass


def _err(msg: str) -> DispatchParseError:
    return DispatchParseError(f"cannot read AITER's generated dispatch: {msg}",
                              hint="this AITER version writes C++ jitkiln does not understand yet; "
                                   "use a supported amd-aiter (0.1.7.post2.dev18) or report the header text")


def preprocess(text: str, defines=DEFINES) -> str:
    """Drop comments, resolve ``#if defined(X)``/``#ifdef``/``#else``/``#endif``, drop other directives."""
    text = text.replace("\\\n", " ")
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    out, stack = [], []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("//"):
            continue
        if s.startswith("#"):
            d = s[1:].strip()
            m = re.match(r"if\s+defined\s*\(?\s*(\w+)\s*\)?\s*$", d) or re.match(r"ifdef\s+(\w+)\s*$", d)
            if m:
                stack.append(m.group(1) in defines)
            elif re.match(r"ifndef\s+(\w+)", d):
                stack.append(re.match(r"ifndef\s+(\w+)", d).group(1) not in defines)
            elif d.startswith("if"):
                raise _err(f"unsupported preprocessor condition {s!r}")
            elif d.startswith("else"):
                stack[-1] = not stack[-1]
            elif d.startswith("endif"):
                stack.pop()
            continue
        if all(stack):
            out.append(re.sub(r"//.*$", "", line))
    return "\n".join(out)


_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>\d+)|(?P<id>[A-Za-z_]\w*(?:::\w+)*)|'
                    r'(?P<op>==|!=|<=|>=|&&|\|\||[-+*/%<>!(){};,\[\]=&:.?]))')


def tokenize(text: str) -> list[tuple[str, str]]:
    toks, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise _err(f"unexpected text {text[pos:pos + 30]!r}")
        pos = m.end()
        kind = m.lastgroup
        toks.append((kind, m.group(kind)))
    return toks


# --- expression trees: tuples ('num', n) ('id', name) ('bin', op, a, b) ('not', a) ('dtype', T, var)
#     ('sizeof', T) ('cast', a) ('targs', stage, [exprs]) ----------------------------------------------------

class _Parser:
    def __init__(self, toks):
        self.t = toks
        self.i = 0

    def peek(self, k=0):
        j = self.i + k
        return self.t[j][1] if j < len(self.t) else None

    def take(self, want=None):
        if self.i >= len(self.t):
            raise _err(f"unexpected end, expected {want!r}")
        v = self.t[self.i][1]
        if want is not None and v != want:
            raise _err(f"expected {want!r}, found {v!r} near {' '.join(x[1] for x in self.t[self.i:self.i + 8])}")
        self.i += 1
        return v

    # expressions ------------------------------------------------------------------------------------------------
    def expr(self, tmpl=False):
        return self.binary(0, tmpl)

    _LEVELS = [("||",), ("&&",), ("==", "!="), ("<", "<=", ">", ">="), ("+", "-"), ("*", "/", "%")]

    def binary(self, level, tmpl):
        if level == len(self._LEVELS):
            return self.unary(tmpl)
        a = self.binary(level + 1, tmpl)
        while self.peek() in self._LEVELS[level]:
            if tmpl and self.peek() in ("<", ">"):
                break  # inside a template argument list '>' closes the list
            op = self.take()
            b = self.binary(level + 1, tmpl)
            a = ("bin", op, a, b)
        return a

    def unary(self, tmpl):
        if self.peek() == "!":
            self.take()
            return ("not", self.unary(tmpl))
        if self.peek() == "-":
            self.take()
            return ("bin", "-", ("num", 0), self.unary(tmpl))
        return self.primary(tmpl)

    def primary(self, tmpl):
        tok = self.peek()
        if tok is None:
            raise _err("unexpected end of expression")
        kind = self.t[self.i][0]
        if tok == "(":
            self.take("(")
            e = self.expr()
            self.take(")")
            return e
        if kind == "num":
            return ("num", int(self.take()))
        if kind == "str":
            return ("str", self.take()[1:-1])
        if kind != "id":
            raise _err(f"unexpected {tok!r}")
        name = self.take()
        if name == "dtype_checker":
            self.take("<"); T = self.take(); self.take(">")
            self.take("{"); self.take("}"); self.take("(")
            var = self.take(); self.take(")")
            return ("dtype", T, var)
        if name == "sizeof":
            self.take("("); T = self.take(); self.take(")")
            return ("sizeof", T)
        if name == "static_cast":
            self.take("<"); self.take(); self.take(">")
            self.take("(")
            e = self.expr()
            self.take(")")
            return ("cast", e)
        m = re.fullmatch(r"ck_moe_stage(\d)_gemm", name)
        if m:
            return ("targs", int(m.group(1)), self.template_args())
        if name in ("true", "false"):
            return ("num", int(name == "true"))
        return ("id", name)

    def template_args(self):
        self.take("<")
        args = []
        while True:
            args.append(self.expr(tmpl=True))
            if self.peek() == ",":
                self.take(",")
                continue
            self.take(">")
            return args

    # statements -----------------------------------------------------------------------------------------------
    def stmt(self):
        tok = self.peek()
        if tok == "{":
            self.take("{")
            body = []
            while self.peek() != "}":
                body.append(self.stmt())
            self.take("}")
            return ("block", body)
        if tok == "if":
            self.take("if"); self.take("(")
            cond = self.expr()
            self.take(")")
            then = self.stmt()
            other = None
            if self.peek() == "else":
                self.take("else")
                other = self.stmt()
            return ("if", cond, then, other)
        if tok == "return":
            self.take("return")
            e = self.expr()
            self.take(";")
            return ("return", e)
        if tok == "TORCH_CHECK":
            self.take("TORCH_CHECK"); self.take("(")
            args = [self.expr()]
            while self.peek() == ",":
                self.take(",")
                args.append(self.expr())
            self.take(")"); self.take(";")
            return ("check", args)
        if tok == ";":
            self.take(";")
            return ("block", [])
        raise _err(f"unsupported statement starting {tok!r}")


@dataclass
class DispatchFunction:
    stage: int
    params: list[tuple[str, str]]  # (type, name) in order
    body: tuple
    text: str  # the preprocessed header, for error messages

    @property
    def param_names(self) -> list[str]:
        return [n for _, n in self.params]


def parse_dispatch(text: str, stage: int) -> DispatchFunction:
    src = preprocess(text)
    fname = f"moe_stage{stage}_heuristic_dispatch"
    m = re.search(rf"\bMoeKernel\s+{fname}\s*\((.*?)\)\s*{{", src, re.S)
    if not m:
        raise _err(f"no function {fname} found")
    params = []
    for p in m.group(1).split(","):
        p = " ".join(p.split())
        mm = re.fullmatch(r"(.+?)\s*([A-Za-z_]\w*)", p)
        if not mm:
            raise _err(f"unreadable parameter {p!r} of {fname}")
        params.append((mm.group(1), mm.group(2)))
    toks = tokenize(src[m.end() - 1:])
    ps = _Parser(toks)
    body = ps.stmt()
    return DispatchFunction(stage, params, body, src)


def parse_lookup(text: str) -> dict[str, tuple[int, list]]:
    """``{"kernel name": (stage, [template argument trees])}`` from ``gemm_moe_ck2stages_lookup.h``."""
    src = preprocess(text)
    m = re.search(r"#?\s*define\s+GENERATE_LOOKUP_TABLE\(\)", text)
    if not m:
        raise _err("the lookup header has no GENERATE_LOOKUP_TABLE()")
    body = text[m.end():].replace("\\\n", " ")
    toks = tokenize(re.sub(r"//.*", "", body))
    out: dict[str, tuple[int, list]] = {}
    ps = _Parser(toks)
    while ps.i < len(toks):
        kind, v = toks[ps.i]
        if kind == "str" and ps.peek(1) == "," and re.fullmatch(r"ck_moe_stage\d_gemm", ps.peek(2) or ""):
            name = v[1:-1]
            ps.i += 2
            e = ps.primary(False)
            out[name] = (e[1], e[2])
        else:
            ps.i += 1
    del src
    return out


# --- evaluation ------------------------------------------------------------------------------------------------

class Env:
    """Values of the dispatch's parameters plus the enums its conditions name."""

    def __init__(self, values: Mapping[str, Any], enums: Mapping[str, int]):
        self.values = dict(values)
        self.enums = dict(enums)

    def ident(self, name: str, as_type_ok: bool):
        if name in self.values:
            return self.values[name]
        if name in self.enums:
            return self.enums[name]
        m = re.fullmatch(r"V(\d+)", name)
        if m:  # ck::BlockGemmPipelineVersion::vN, declared as VN by AITER
            return int(m.group(1))
        if as_type_ok:
            return name  # a type (FP4X2, MulABScale...)
        raise _err(f"unknown name {name!r} in a condition")


def evaluate(e, env: Env, as_type_ok: bool = False):
    k = e[0]
    if k == "num":
        return e[1]
    if k == "str":
        return e[1]
    if k == "id":
        return env.ident(e[1], as_type_ok)
    if k == "not":
        return int(not evaluate(e[1], env))
    if k == "dtype":
        return int(env.values.get(e[2]) == e[1])
    if k == "sizeof":
        if e[1] not in SIZEOF:
            raise _err(f"sizeof of unknown type {e[1]!r}")
        return SIZEOF[e[1]]
    if k == "cast":
        return int(evaluate(e[1], env))
    if k == "bin":
        op = e[1]
        if op == "&&":
            return int(bool(evaluate(e[2], env)) and bool(evaluate(e[3], env)))
        if op == "||":
            return int(bool(evaluate(e[2], env)) or bool(evaluate(e[3], env)))
        a, b = evaluate(e[2], env, as_type_ok), evaluate(e[3], env, as_type_ok)
        if op in ("==", "!="):
            return int((a == b) == (op == "=="))
        if not (isinstance(a, int) and isinstance(b, int)):
            raise _err(f"arithmetic on non-numbers {a!r} {op} {b!r}")
        return {"<": int(a < b), "<=": int(a <= b), ">": int(a > b), ">=": int(a >= b),
                "+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0,
                "%": a % b if b else 0}[op]
    if k == "targs":
        return ("kernel", e[1], normalize_targs(e[2], env))
    raise _err(f"unsupported expression {e!r}")


def normalize_targs(args: list, env: Env) -> tuple[str, ...]:
    """Template arguments as strings: type names, integers (bools as 0/1, pipeline VN as N)."""
    return tuple(str(evaluate(a, env, as_type_ok=True)) for a in args)


class DispatchFailed(Exception):
    """AITER's dispatch would raise TORCH_CHECK with this message."""


def run(fn: DispatchFunction, env: Env) -> tuple[int, tuple[str, ...]]:
    """Evaluate the dispatch for one call: ``(stage, template args)`` or :class:`DispatchFailed`."""
    r = _exec(fn.body, env)
    if r is None:
        raise DispatchFailed("control reached the end of the dispatch function without a return")
    return r


def _exec(s, env: Env):
    k = s[0]
    if k == "block":
        for x in s[1]:
            r = _exec(x, env)
            if r is not None:
                return r
        return None
    if k == "if":
        if evaluate(s[1], env):
            return _exec(s[2], env)
        return _exec(s[3], env) if s[3] is not None else None
    if k == "return":
        v = evaluate(s[1], env)
        if not (isinstance(v, tuple) and v[0] == "kernel"):
            raise _err("a return that is not a ck_moe_stageN_gemm<...> instantiation")
        return v[1], v[2]
    if k == "check":
        if not evaluate(s[1][0], env):
            raise DispatchFailed("".join(str(evaluate(a, env, as_type_ok=True)) for a in s[1][1:]))
        return None
    raise _err(f"unsupported statement {k}")


def thresholds(fn: DispatchFunction, var: str) -> list[int]:
    """Constants ``var`` is compared with anywhere in the dispatch (to enumerate its decision regions)."""
    found: set[int] = set()

    def walk(x):
        if isinstance(x, tuple):
            if x and x[0] == "bin" and x[1] in ("==", "!=", "<", "<=", ">", ">="):
                a, b = x[2], x[3]
                if a == ("id", var) and b[0] == "num":
                    found.add(b[1])
                if b == ("id", var) and a[0] == "num":
                    found.add(a[1])
            for y in x:
                walk(y)
        elif isinstance(x, list):
            for y in x:
                walk(y)

    walk(fn.body)
    return sorted(found)


def parse_enum(text: str, name: str) -> dict[str, int]:
    """``enum class NAME { A, B = 3, ... }`` -> {"NAME::A": 0, ...}."""
    m = re.search(rf"enum\s+class\s+{name}\b[^{{]*{{(.*?)}}", text, re.S)
    if not m:
        return {}
    out, v = {}, -1
    for item in re.sub(r"//.*", "", m.group(1)).split(","):
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            k, val = item.split("=", 1)
            v = int(val.strip(), 0)
            item = k.strip()
        else:
            v += 1
        out[f"{name}::{item}"] = v
    return out


def used_arithmetically(fn: DispatchFunction, var: str) -> bool:
    """Whether ``var`` appears inside arithmetic (``inter_dim % 256 == 0``): then its decision regions are not
    intervals, and only exact values can be enumerated."""
    def walk(x, in_arith):
        if isinstance(x, tuple):
            if x == ("id", var):
                return in_arith
            arith = in_arith or (len(x) > 1 and x[0] == "bin" and x[1] in ("+", "-", "*", "/", "%"))
            return any(walk(y, arith) for y in x)
        if isinstance(x, list):
            return any(walk(y, in_arith) for y in x)
        return False
    return walk(fn.body, False)
