"""Random tensors are made on their generator's device: a static check of every module in the libraries.

``torch.randn(shape, generator=g)`` allocates on the *default* device (the CPU) and fails as soon as ``g`` is a CUDA
generator ("Expected a 'cpu' device type for generator"), a bug that only shows on a GPU. So every call of a tensor
factory that draws random numbers (``torch.rand``, ``randn``, ``randint``, ``randperm``, the factory form of
``torch.normal``) and passes ``generator=`` must also pass ``device=``. In-place samplers (``Tensor.normal_``,
``uniform_``, ``bernoulli_``, ...) and the ``*_like`` functions take their device from a tensor and are fine, unless
that tensor is itself made on the spot by a factory without ``device=`` (``torch.empty(n).normal_(generator=g)``).

The one exception the checker accepts is a generator that is provably on the CPU: built in the same function (or
inline) as ``torch.Generator()`` / ``torch.Generator("cpu")``, optionally followed by ``.manual_seed(...)``; a CPU
tensor from a CPU generator is correct on every machine.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("autoencoder", "diffusion", "pipelines")

FACTORIES = {"rand", "randn", "randint", "randperm"}  # create a tensor; no tensor argument to take a device from
NORMAL = "normal"  # a factory only in its ``normal(mean: float, std: float, size, ...)`` form
IN_PLACE = {"normal_", "uniform_", "bernoulli_", "random_", "exponential_", "cauchy_", "log_normal_", "geometric_"}
ALLOCATORS = {"empty", "zeros", "ones", "full", "tensor", "arange", "linspace", "eye", "as_tensor"} | FACTORIES


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _has_star_kwargs(call: ast.Call) -> bool:
    """``f(..., **options)`` may carry ``device``: a static check cannot tell, so it gives the benefit of the doubt."""
    return any(k.arg is None for k in call.keywords)


class _Checker(ast.NodeVisitor):
    """Collects ``(line, text)`` of calls that pass ``generator=`` to a random tensor factory without ``device=``."""

    def __init__(self, source: str):
        self.source = source
        self.torch_names: set[str] = set()  # names bound to the torch module (``import torch as th``)
        self.imported: dict[str, str] = {}  # local name -> torch function (``from torch import randn as r``)
        self.scopes: list[dict[str, list[ast.expr]]] = [{}]  # per function: name -> every value assigned to it
        self.offences: list[tuple[int, str]] = []

    # ---------------------------------------------------------------------------- names and scopes

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "torch":
                self.torch_names.add(alias.asname or "torch")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module == "torch":
            for alias in node.names:
                self.imported[alias.asname or alias.name] = alias.name

    def _visit_scope(self, node: ast.AST) -> None:
        assigned: dict[str, list[ast.expr]] = {}
        for inner in ast.walk(node):
            targets = inner.targets if isinstance(inner, ast.Assign) else \
                [inner.target] if isinstance(inner, (ast.AnnAssign, ast.AugAssign, ast.NamedExpr)) else []
            value = getattr(inner, "value", None)
            for target in targets:
                if isinstance(target, ast.Name):
                    assigned.setdefault(target.id, []).append(value)
        self.scopes.append(assigned)
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _visit_scope

    def visit_Module(self, node: ast.Module) -> None:
        for inner in node.body:  # module-level assignments form the outermost scope
            if isinstance(inner, ast.Assign):
                for target in inner.targets:
                    if isinstance(target, ast.Name):
                        self.scopes[0].setdefault(target.id, []).append(inner.value)
        self.generic_visit(node)

    # ---------------------------------------------------------------------------- what a call is

    def _torch_function(self, func: ast.expr) -> str | None:
        """``"randn"`` for ``torch.randn`` / ``th.randn`` / an imported ``randn``; else None."""
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in self.torch_names:
            return func.attr
        if isinstance(func, ast.Name) and func.id in self.imported:
            return self.imported[func.id]
        return None

    def _is_cpu_generator(self, value: ast.expr | None, seen: frozenset[str] = frozenset()) -> bool:
        """``torch.Generator()`` / ``torch.Generator("cpu")`` (``.manual_seed(...)`` allowed), directly or through
        a local name every assignment of which is one."""
        if value is None:
            return False
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr == "manual_seed":
            return self._is_cpu_generator(value.func.value, seen)
        if isinstance(value, ast.Call) and self._torch_function(value.func) == "Generator":
            device = value.args[0] if value.args else _keyword(value, "device")
            return device is None or (isinstance(device, ast.Constant) and device.value == "cpu")
        if isinstance(value, ast.Name) and value.id not in seen:
            for scope in reversed(self.scopes):
                if value.id in scope:
                    values = scope[value.id]
                    return all(self._is_cpu_generator(v, seen | {value.id}) for v in values)
        return False

    def _risky_generator(self, call: ast.Call) -> bool:
        generator = _keyword(call, "generator")
        if generator is None or (isinstance(generator, ast.Constant) and generator.value is None):
            return False
        return not self._is_cpu_generator(generator)

    def _makes_tensor_without_device(self, call: ast.Call) -> bool:
        """A factory call that puts its tensor on the default device."""
        name = self._torch_function(call.func)
        if name == NORMAL:
            factory_form = _keyword(call, "size") is not None or len(call.args) >= 3
            return factory_form and _keyword(call, "device") is None and not _has_star_kwargs(call)
        return name in FACTORIES and _keyword(call, "device") is None and not _has_star_kwargs(call)

    def visit_Call(self, node: ast.Call) -> None:
        bad = False
        if self._risky_generator(node):
            if self._makes_tensor_without_device(node):
                bad = True
            elif isinstance(node.func, ast.Attribute) and node.func.attr in IN_PLACE:
                receiver = node.func.value  # torch.empty(n).normal_(generator=g): the tensor is on the CPU
                bad = (isinstance(receiver, ast.Call) and self._torch_function(receiver.func) in ALLOCATORS
                       and _keyword(receiver, "device") is None and not _has_star_kwargs(receiver))
        if bad:
            self.offences.append((node.lineno, ast.get_source_segment(self.source, node) or ""))
        self.generic_visit(node)


def offending_calls(source: str) -> list[tuple[int, str]]:
    """``(line, call)`` of every random tensor factory call in ``source`` with ``generator=`` but no ``device=``."""
    checker = _Checker(source)
    checker.visit(ast.parse(source))
    return checker.offences


def library_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


# -------------------------------------------------------------------------------------------------- the checker


def _flagged(code: str) -> list[str]:
    return [text for _, text in offending_calls(textwrap.dedent(code))]


def test_the_checker_flags_device_less_factories_with_a_generator():
    bad = _flagged("""
        import torch
        import torch as th
        from torch import randn as gaussian

        def draw(shape, generator, g2):
            a = torch.randn(shape, generator=generator)
            b = torch.rand(3, 4, generator=generator, dtype=torch.float64)
            c = th.randint(0, 10, (5,), generator=g2)
            d = torch.randperm(7, generator=generator)
            e = gaussian(shape, generator=generator)
            f = torch.normal(0.0, 1.0, size=(3,), generator=generator)
            g = torch.normal(0.0, 1.0, (3,), generator=generator)
            h = torch.empty(4).normal_(generator=generator)
            cuda = torch.Generator("cuda").manual_seed(0)
            i = torch.randn(2, generator=cuda)
            return a, b, c, d, e, f, g, h, i
        """)
    assert len(bad) == 9, bad
    assert bad[0] == "torch.randn(shape, generator=generator)" and bad[-1] == "torch.randn(2, generator=cuda)"


def test_the_checker_accepts_devices_tensors_and_cpu_generators():
    assert _flagged("""
        import torch

        CPU = torch.Generator()

        def draw(x, shape, generator, options):
            torch.randn(shape, generator=generator, device=x.device)
            torch.randint(0, 3, (2,), generator=generator, device=generator.device)
            torch.randn(shape)  # the global RNG: no generator to disagree with
            torch.randn(shape, generator=None)
            torch.rand_like(x)
            x.normal_(generator=generator)  # the tensor's own device
            torch.empty(3, device=x.device).uniform_(generator=generator)
            torch.bernoulli(x, generator=generator)
            torch.normal(x, 1.0, generator=generator)  # tensor mean: its device
            torch.randn(shape, generator=generator, **options)  # may carry device: not decidable
            local = torch.Generator().manual_seed(0)
            torch.randperm(5, generator=local)
            torch.randn(shape, generator=torch.Generator("cpu").manual_seed(1))
            torch.randn(shape, generator=CPU)
        """) == []


def test_a_generator_that_is_not_always_on_the_cpu_is_not_trusted():
    assert len(_flagged("""
        import torch

        def draw(device):
            g = torch.Generator()
            if device.type == "cuda":
                g = torch.Generator(device)
            return torch.randn(3, generator=g)
        """)) == 1


# -------------------------------------------------------------------------------------------------- the libraries


def test_the_checker_sees_every_library_module():
    files = library_files()
    assert len(files) > 30
    names = {p.relative_to(ROOT).as_posix() for p in files}
    assert {"diffusion/sampling.py", "pipelines/stages/train_diffusion.py", "pipelines/stages/generate.py"} <= names
    calls = sum(len([n for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Call)
                     and any(k.arg == "generator" for k in n.keywords)]) for p in files)
    assert calls > 20  # the checker has something to check


@pytest.mark.parametrize("path", library_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_random_tensor_is_made_off_its_generators_device(path):
    offences = offending_calls(path.read_text(encoding="utf-8"))
    assert not offences, "\n".join(
        f"{path.relative_to(ROOT)}:{line}: {text}  <- pass device= (e.g. device=generator.device)"
        for line, text in offences)
