"""Check that a ``model.pt2`` is data before ``torch.export.load`` reads it.

A result folder is shared like a checkpoint, so ``fxzip.load`` treats it as
untrusted. ``torch.export.load`` is not safe on an untrusted archive
(torch 2.14): it parses the symbolic shape expressions of ``models/*.json``
with ``sympy.sympify`` (Python ``eval``), unpickles weights, constants and
custom objects marked ``use_pickle`` with ``weights_only=False``, retries the
sample inputs with ``weights_only=False`` when the safe load fails, compiles
``guards_code`` into a Python function, and resolves a node target such as
``torch.os.system`` by attribute lookup, to be called when the model runs.

fxzip's own programs need none of that: ATen operations, raw tensor payloads,
symbols for the batch dimension, and guards that compare the inputs' sizes
(a batch dimension several inputs share). ``check_program`` accepts exactly that and
refuses anything else with an error naming the member and what it holds,
before ``torch.export.load`` touches the file.
"""
from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["UnsafeProgramError", "check_program"]


class UnsafeProgramError(ValueError):
    """A ``model.pt2`` holds something that would run code when loaded or called."""


_MEMBERS = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/[\w.-]+\.json"
    r"|data/weights/(weight_\d+|[\w.-]+_weights_config\.json)"
    r"|data/constants/(tensor_\d+|[\w.-]+_constants_config\.json)"
    r"|data/sample_inputs/[\w.-]+\.pt)")
"""Members an exported program of ATen operations has (below the archive's top
folder). AOTInductor libraries, custom objects and legacy pickled weights are not
among them."""

_OPERATOR_TARGETS = frozenset({
    "_operator.getitem", "_operator.add", "_operator.sub", "_operator.mul", "_operator.floordiv",
    "_operator.truediv", "_operator.mod", "_operator.neg", "_operator.pow", "_operator.eq", "_operator.ne",
    "_operator.lt", "_operator.le", "_operator.gt", "_operator.ge", "_operator.and_", "_operator.or_",
    "math.ceil", "math.floor", "math.trunc", "math.sqrt",
})
"""Python operators a program may call on shapes (symbolic sizes), besides ATen ops."""

_OP_NAMESPACES = ("aten", "prims")

_SYMPY_NAMES = frozenset({
    # sympy's printed classes and the assumptions of a shape symbol
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le",
    "Gt", "Ge", "And", "Or", "Not", "true", "false", "True", "False", "oo", "zoo", "nan", "Half", "One", "Zero",
    "NegativeOne", "Infinity", "NegativeInfinity", "int_oo", "IntInfinity", "NegativeIntInfinity",
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "infinite", "zero",
    "nonzero", "even", "odd", "rational", "commutative", "precision",
    # torch.utils._sympy.functions, as torch's deserializer names them
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt",
    "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "Identity_", "OpaqueUnaryFn_sqrt",
    "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "BitwiseFn_bitwise_xor",
})
_EXPR_TOKEN = re.compile(r"\s+|\d+(\.\d+)?([eE][+-]?\d+)?|[A-Za-z_]\w*|'[a-z]+\d+'|[()+\-*/,=<>!%&|~]|\*\*")


def check_program(path: str | Path) -> None:
    """Raise ``UnsafeProgramError`` unless ``path`` is an exported program of
    ATen operations with raw tensor payloads (see the module docstring)."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UnsafeProgramError(f"{path} is not a torch.export archive ({exc}); save the result again") from None
    with archive:
        names = archive.namelist()
        tops = {n.split("/", 1)[0] for n in names}
        if len(tops) != 1:
            raise UnsafeProgramError(f"{path}: a torch.export archive has one top folder, this one has {sorted(tops)}")
        top = tops.pop() + "/"
        for name in names:
            rest = name[len(top):]
            if rest and not name.endswith("/") and not _MEMBERS.fullmatch(rest):
                raise UnsafeProgramError(f"{path}: member {rest!r} is not part of a program of ATen operations "
                                         "(fxzip refuses archives with compiled libraries, custom objects or "
                                         "pickled payloads); save the result again with fxzip")
        for name in names:
            rest = name[len(top):]
            if rest.endswith(("_weights_config.json", "_constants_config.json")):
                _check_payloads(path, rest, _json(archive, name, path))
            elif rest.startswith("models/"):
                _check_graph(path, rest, _json(archive, name, path))
            elif rest.startswith("data/sample_inputs/"):
                _check_tensors_only(path, rest, archive.read(name))


def _json(archive: zipfile.ZipFile, name: str, path: Path) -> Any:
    try:
        return json.loads(archive.read(name))
    except ValueError as exc:
        raise UnsafeProgramError(f"{path}: {name} is not JSON ({exc}); save the result again") from None


def _check_payloads(path: Path, member: str, config: Any) -> None:
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise UnsafeProgramError(f"{path}: {member} has no 'config' table")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise UnsafeProgramError(f"{path}: {member} stores {fqn!r} as a pickle, which torch.export.load "
                                     "unpickles with weights_only=False; fxzip loads raw tensor payloads only")
        if not re.fullmatch(r"(weight|tensor)_\d+", str(meta.get("path_name", ""))):
            raise UnsafeProgramError(f"{path}: {member} stores {fqn!r} as {meta.get('path_name')!r}, not a tensor "
                                     "payload (custom and opaque objects are unpickled when loaded)")


def _check_tensors_only(path: Path, member: str, payload: bytes) -> None:
    """torch.export.load retries a failed ``weights_only`` load of the sample
    inputs without it: they must load with ``weights_only=True``."""
    try:
        torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means torch would fall back to full unpickling
        raise UnsafeProgramError(f"{path}: {member} is not plain tensors ({type(exc).__name__}); torch.export.load "
                                 "would unpickle it with weights_only=False") from None


def _check_graph(path: Path, member: str, program: Any) -> None:
    if not isinstance(program, dict):
        raise UnsafeProgramError(f"{path}: {member} is not an exported program")
    guards = program.get("guards_code") or []
    if not isinstance(guards, list):
        raise UnsafeProgramError(f"{path}: {member} carries guards_code that is not a list of shape checks")
    for guard in guards:
        _check_guard(path, member, guard)
    for key in program.get("range_constraints") or {}:
        _check_expression(path, member, key)
    for key, value in _items(program):
        if key == "target" and isinstance(value, str):
            _check_target(path, member, value)
        elif key == "expr_str" and isinstance(value, str):
            _check_expression(path, member, value)
        elif key in ("as_custom_obj", "as_opaque_object", "custom_obj_info") and value:
            raise UnsafeProgramError(f"{path}: {member} passes a custom object ({key}); fxzip's programs hold "
                                     "tensors and ATen operations only")


def _items(value: Any) -> Iterator[tuple[str, Any]]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                yield k, v
                stack.append(v)
        elif isinstance(item, list):
            stack.extend(item)


def _check_target(path: Path, member: str, target: str) -> None:
    if target in _OPERATOR_TARGETS:
        return
    parts = target.split(".")
    if len(parts) == 5 and parts[:2] == ["torch", "ops"] and parts[2] in _OP_NAMESPACES:
        packet = getattr(getattr(torch.ops, parts[2]), parts[3], None) if hasattr(torch.ops, parts[2]) else None
        if isinstance(packet, torch._ops.OpOverloadPacket) and parts[4] in packet.overloads():
            return
    raise UnsafeProgramError(f"{path}: {member} calls {target!r}, which is not an ATen operation; fxzip loads "
                             "programs of ATen operations only (a target is looked up by name and called when the "
                             "model runs)")


_GUARD_NODES = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.FloorDiv,
                ast.Mod, ast.UnaryOp, ast.USub, ast.Not, ast.Compare, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt,
                ast.GtE, ast.Constant, ast.Load)


def _check_guard(path: Path, member: str, text: Any) -> None:
    """A guard torch compiles into a function on load: only comparisons of
    arithmetic over the inputs' sizes pass (``L['x'].size()[0] == L['y'].size()[0]``,
    what a batch dimension shared by several inputs gives): integer constants,
    ``+ - * // %``, comparisons, ``and`` / ``or`` / ``not``, and
    ``L['<name>'].size()[<int>]`` as the only name, attribute, call and subscript."""
    def refuse(why: str) -> None:
        raise UnsafeProgramError(f"{path}: {member} carries guards_code {str(text)[:80]!r}, which is not a check "
                                 f"of input sizes ({why}); torch would compile it into a function on load")

    if not isinstance(text, str):
        refuse("not text")
    if any(c in text for c in '"\\#\n\r'):  # torch pastes the guard into a string literal of the code it compiles
        refuse("a quote, backslash, comment or line break")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        refuse("not an expression")
    sizes: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Call):
            call = node.value
            func = call.func
            ok = (isinstance(node.slice, ast.Constant) and type(node.slice.value) is int and not call.args
                  and not call.keywords and isinstance(func, ast.Attribute) and func.attr == "size"
                  and isinstance(func.value, ast.Subscript) and isinstance(func.value.value, ast.Name)
                  and func.value.value.id == "L" and isinstance(func.value.slice, ast.Constant)
                  and isinstance(func.value.slice.value, str)
                  and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", func.value.slice.value) is not None)
            if not ok:
                refuse("a call other than L['<input>'].size()[<int>]")
            sizes.update(id(n) for n in (node.slice, call, func, func.value, func.value.value, func.value.slice))
            sizes.update(id(n) for n in ast.walk(func.value) if isinstance(n, ast.Load))
            sizes.update((id(func.ctx), id(node.ctx)))
        elif id(node) in sizes:
            continue
        elif not isinstance(node, _GUARD_NODES) or (isinstance(node, ast.Constant) and type(node.value) is not int):
            refuse(f"{type(node).__name__}")


def _check_expression(path: Path, member: str, text: str) -> None:
    """A shape expression as torch prints it (``Symbol('s77', positive=True,
    integer=True)``, ``2*s0 + 1``): torch parses it with ``sympy.sympify``,
    i.e. ``eval``, so only sympy's names, numbers, operators and quoted symbol
    names pass."""
    pos = 0
    while pos < len(text):
        match = _EXPR_TOKEN.match(text, pos)
        word = match.group(0) if match else text[pos:pos + 20]
        if match is None or (word[0].isalpha() or word[0] == "_") and not (
                word in _SYMPY_NAMES or re.fullmatch(r"[a-z]+\d+", word)):
            raise UnsafeProgramError(f"{path}: {member} holds the shape expression {text[:80]!r}, which is not "
                                     f"one (at {word!r}); torch would evaluate it as Python when loading")
        pos = match.end()
