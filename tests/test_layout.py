"""The package's layout, read from its source: the rules of the renovation, kept.

Every module at most 400 lines; no import cycle among jxent's modules; no
private name imported across modules; the dense-or-fused choice
(``isinstance(..., LinearLogits)``) made in at most two modules (the
positions step, which validates, and the engine, which dispatches); every
public function on logits calls, in order, the options parsers, a positions
builder, the engine's ``run`` and (the losses) ``reduce`` (README's structure),
parses all its options in one call (one record, no raw option read beside it),
and checks nothing itself (every check is in the options or positions step).
"""

import ast
import itertools
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jxent"


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (path, ast.parse(path.read_text()))
    return out


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))
    return node.module or ""


def imports(name: str, path, tree) -> list[tuple[str, list[str]]]:
    """``(imported module, names)`` for every ``from ... import`` inside jxent, anywhere."""
    out = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(name, node, is_package)
            if target.startswith("jxent"):
                out.append((target, [a.name for a in node.names]))
    return out


def test_no_module_is_over_400_lines():
    long = {
        str(path.relative_to(PACKAGE.parent)): n
        for path, _ in modules().values()
        if (n := len(path.read_text().splitlines())) > 400
    }
    assert not long, long


def test_no_private_name_crosses_a_module_wall():
    mods = modules()
    crossings = [
        (name, target, n)
        for name, (path, tree) in mods.items()
        for target, names in imports(name, path, tree)
        for n in names
        if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in mods
    ]
    assert not crossings, crossings


def test_no_import_cycle():
    mods = modules()
    graph = {}
    for name, (path, tree) in mods.items():
        deps = set()
        for target, names in imports(name, path, tree):
            for n in names:  # `from . import _loop` imports a module
                if f"{target}.{n}" in mods:
                    deps.add(f"{target}.{n}")
            if target in mods:
                deps.add(target)
        graph[name] = deps - {name}
    # A package's __init__ importing its own submodules is not a cycle of modules.
    for name in graph:
        graph[name] = {d for d in graph[name] if not (name.startswith(d + ".") and d in mods)}

    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                raise AssertionError(" -> ".join(stack + [node, dep]))
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_dense_or_fused_choice_is_made_in_at_most_two_modules():
    deciders = set()
    for name, (_, tree) in modules().items():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "isinstance"
                and "LinearLogits" in ast.unparse(node.args[1])
            ):
                deciders.add(name)
    assert deciders <= {"jxent._positions", "jxent._engine"}, deciders
    assert len(deciders) <= 2


# The public functions on logits, and whether their result passes through `reduce`.
FOUR_STEPS = {
    "jxent._softmax": {"softmax_cross_entropy": True},
    "jxent._sequence": {"sequence_nll": True, "nll_stats": False},
    "jxent._distillation": {"distillation_loss": True},
    "jxent._tokens": {"token_stats": False, "token_objective": False},
    "jxent._classes": {"class_log_probs": False},
}
# A step is a call of one of these (None: any function of that module).
STEPS = {
    "options": ("jxent._options", None), "positions": ("jxent._positions", None),
    "engine": ("jxent._engine", "run"), "reduce": ("jxent._reduce", "reduce"),
}


def _functions(mods) -> dict:
    """Every module-level function of the package by ``(module, name)``."""
    return {
        (name, node.name): node
        for name, (_, tree) in mods.items()
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
    }


def _origin(mods, module: str) -> dict:
    """``{local name: defining module}`` for what ``module`` imports from the package."""
    path, tree = mods[module]
    out = {}
    for target, names in imports(module, path, tree):
        out.update({n: target for n in names})
    return out


def _steps(mods, functions, module: str, node, depth: int = 0) -> list[str]:
    """The step of each call in ``node``'s body, in source order; a call to another
    of the package's functions (not a step's) reads as the steps it takes."""
    origin = _origin(mods, module)
    steps = []
    calls = sorted(
        (n for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)),
        key=lambda n: (n.lineno, n.col_offset),
    )
    for call in calls:
        name = call.func.id
        source = origin.get(name, module)
        step = next(
            (s for s, (m, f) in STEPS.items() if source == m and f in (None, name)), None
        )
        if step:
            steps.append(step)
        elif (source, name) in functions and depth < 3:
            steps += _steps(mods, functions, source, functions[source, name], depth + 1)
    return steps


def test_every_public_function_on_logits_reads_as_four_steps():
    """Options parsed (`_options`), positions built (`_positions`), the engine run, and
    for the losses the result reduced (`_reduce`), in that order: README's structure."""
    mods = modules()
    functions = _functions(mods)
    for module, names in FOUR_STEPS.items():
        for name, reduced in names.items():
            steps = _steps(mods, functions, module, functions[module, name])
            wanted = ["options", "positions", "engine"] + (["reduce"] if reduced else [])
            # Each step's calls all come before the next step's first.
            assert [s for s in wanted if s in steps] == wanted, (name, steps)
            spans = [[i for i, s in enumerate(steps) if s == w] for w in wanted]
            assert all(a[-1] < b[0] for a, b in itertools.pairwise(spans)), (name, steps)
            assert reduced == ("reduce" in steps), (name, steps)
    public = __import__("jxent").__all__
    listed = {n for names in FOUR_STEPS.values() for n in names}
    on_logits = {n for n in public if n[0].islower() and n.endswith(("_stats", "_nll", "_loss",
                                                                      "_objective", "_probs"))}
    assert on_logits <= listed | {"linear_cross_entropy"}, on_logits - listed


# Parameters that are neither arrays nor options: the class axis is checked against the
# logits' rank (the positions step), the mesh axis is the engine's, `args` are arrays.
NOT_OPTIONS = {"axis", "vocab_axis_name", "args"}


def test_each_public_function_on_logits_parses_its_options_in_one_call():
    """Issue 29.1: one call of `_options` builds one record of all the function's options
    (its parameters not annotated as arrays), and no raw option is read beside it."""
    mods = modules()
    functions = _functions(mods)
    for module, names in FOUR_STEPS.items():
        origin = _origin(mods, module)
        for name in names:
            node = functions[module, name]
            steps = _steps(mods, functions, module, node)
            assert steps.count("options") == 1, (name, steps)
            (call,) = [n for n in ast.walk(node) if isinstance(n, ast.Call)
                       and origin.get(getattr(n.func, "id", None)) == "jxent._options"]
            params = node.args.args + node.args.kwonlyargs
            options = {a.arg for a in params if a.arg not in NOT_OPTIONS
                       and "ArrayLike" not in ast.unparse(a.annotation)}
            inside = [n for n in ast.walk(call) if isinstance(n, ast.Name)]
            assert options <= {n.id for n in inside}, (name, options - {n.id for n in inside})
            beside = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)
                      and not any(n is m for m in inside)}
            assert not options & beside, (name, options & beside)


def _bodies(mods, functions, module: str, node, depth: int = 0):
    """``node`` and the functions of its own module it calls (as ``_steps`` follows them)."""
    yield node
    for call in ast.walk(node):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and depth < 3:
            if (module, call.func.id) in functions and call.func.id not in _origin(mods, module):
                yield from _bodies(mods, functions, module, functions[module, call.func.id],
                                   depth + 1)


def test_the_public_functions_on_logits_check_nothing_themselves():
    """Every check is in a step (issue 29.1): a public function on logits, and its module's
    helpers it calls, raise nothing and call no ``_checks`` function directly."""
    mods = modules()
    functions = _functions(mods)
    for module, names in FOUR_STEPS.items():
        origin = _origin(mods, module)
        for name in names:
            for body in _bodies(mods, functions, module, functions[module, name]):
                raises = [n.lineno for n in ast.walk(body) if isinstance(n, ast.Raise)]
                checks = sorted({
                    n.func.id for n in ast.walk(body)
                    if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                    and origin.get(n.func.id) == "jxent._checks" and n.func.id != "float_dtype"
                })
                assert not raises and not checks, (name, body.name, raises, checks)
