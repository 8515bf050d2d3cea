"""AOT: every plugin kernel compiles to PTX for sm_80, sm_87 and sm_90 without a GPU, with the
parameter order TensorRT launches (tensor inputs, int32 scalars, tensor outputs) and the launch
parameters the ``aot_impl`` hands TensorRT."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from plugins import aot
from plugins.soft_combine.kernels import recipe as soft_combine
from plugins.soft_dispatch.kernels import recipe as soft_dispatch
from plugins.soft_route.kernels import recipe as soft_route
from plugins.topk_combine.kernels import recipe as topk_combine
from plugins.topk_dispatch.kernels import recipe as topk_dispatch
from plugins.topk_route.kernels import recipe as topk_route

# V-MoE B/16 (E=8, k=2, C=1.05, 2 groups of 8 images of 197 tokens) and Soft-MoE S/16 (n=128, p=1) shapes.
G, S, E, K, C, D = 2, 1576, 8, 2, 414, 768
B, M, N, DS = 4, 196, 128, 384
RECIPES = {
    "TopKRoute": topk_route(G, S, E, K, C, 1),
    "TopKDispatch": topk_dispatch("float16", G, S, D, E * C, E),
    "TopKCombine": topk_combine("float32", G, S, K, D, C),
    "SoftRoute": soft_route(B, M, N),
    "SoftDispatch": soft_dispatch("float16", B, M, DS, N, N, 1),
    "SoftCombine": soft_combine("float32", B, M, DS, N, N, 0),
}
TARGETS = {80: "sm_80", 87: "sm_87", 90: "sm_90a"}
ROOT = Path(__file__).resolve().parents[2]
COMPILE = """
import pickle, sys
from plugins.aot import compile_all
recipes = pickle.load(open(sys.argv[1], "rb"))
compile_all(recipes, sys.argv[2], targets=(80, 87, 90), ptx_version=85)
compile_all(recipes, sys.argv[2], targets=(90,), ptx_version=None)
compile_all(recipes, sys.argv[2], targets=[int(a) for a in sys.argv[3].split(",")], ptx_version=0)  # PER_ARCH
"""
# The lowest PTX ISA each newer target accepts (PER_ARCH); sm_110 (Jetson Thor) where Triton can emit it.
PER_ARCH_ISA = {87: "8.5", 90: "8.5", 100: "8.6", 120: "8.7"} | (
    {110: "9.0"} if aot.target_unsupported(110) is None else {}
)
PER_ARCH_TARGETS = {87: "sm_87", 90: "sm_90a", 100: "sm_100a", 120: "sm_120a", 110: "sm_110a"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """Every recipe compiled once by ``compile_all``, in a process without TRITON_INTERPRET (Triton
    decorates its own library for the interpreter at import, and then cannot compile)."""
    folder = tmp_path_factory.mktemp("ptx")
    (folder / "recipes.pkl").write_bytes(pickle.dumps(list(RECIPES.values())))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    arches = ",".join(map(str, PER_ARCH_ISA))
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE, str(folder / "recipes.pkl"), str(folder / "out"), arches],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / "out"


def compiled(bundle: Path, name: str, arch: int, ptx_version: int | None) -> aot.CompiledPTX:
    kernel = aot.load_precompiled(RECIPES[name], arch, ptx_version, bundle)
    assert kernel is not None, (name, arch, ptx_version)
    return kernel


def entry_params(ptx: str, name: str) -> list[str]:
    """``"ptr"`` or ``"u32"`` per kernel parameter, in order."""
    match = re.search(rf"\.entry {name}\((.*?)\)", ptx, re.S)
    assert match, f"no .entry {name} in the PTX"
    return ["ptr" if ".u64" in p else p.split()[1].lstrip(".") for p in match.group(1).split(",")]


@pytest.mark.parametrize("arch", sorted(TARGETS))
@pytest.mark.parametrize("name", list(RECIPES))
def test_ptx_for_every_target_at_isa_8_5(bundle, name, arch):
    recipe = RECIPES[name]
    kernel = compiled(bundle, name, arch, 85)
    assert kernel.name == recipe.kernel
    assert re.search(r"^\.version 8\.5$", kernel.ptx, re.M)
    assert re.search(rf"^\.target {TARGETS[arch]}$", kernel.ptx, re.M)
    expected = ["ptr"] * len(recipe.inputs) + ["u32"] * len(recipe.scalars) + ["ptr"] * len(recipe.outputs)
    # Triton appends two scratch pointers TensorRT does not pass; compile_ptx checks they go unused
    # and drops them, so the entry takes exactly what TensorRT passes (padded with nulls or not).
    assert entry_params(kernel.ptx, kernel.name) == expected
    assert kernel.num_warps == recipe.num_warps
    assert kernel.shared <= 48 * 1024  # no opt-in to large shared memory needed


@pytest.mark.parametrize("name", list(RECIPES))
def test_default_isa_for_sm_90(bundle, name):
    kernel = compiled(bundle, name, 90, None)
    version = re.search(r"^\.version (\d+)\.(\d+)$", kernel.ptx, re.M)
    assert version and (int(version[1]), int(version[2])) >= (8, 5)
    assert re.search(r"^\.target sm_90a$", kernel.ptx, re.M)
    assert f".entry {kernel.name}(" in kernel.ptx


@pytest.mark.parametrize("arch", sorted(PER_ARCH_ISA))
@pytest.mark.parametrize("name", list(RECIPES))
def test_ptx_isa_per_architecture(bundle, name, arch):
    """PER_ARCH (the default everywhere, the TensorRT build's lookup key included) gives each target
    the lowest PTX ISA it accepts: 8.5 for Orin and Hopper, 8.6 sm_100, 8.7 sm_120, 9.0 sm_110."""
    kernel = aot.load_precompiled(RECIPES[name], arch, aot.PER_ARCH, bundle)
    assert kernel is not None, (name, arch)
    assert re.search(rf"^\.version {re.escape(PER_ARCH_ISA[arch])}$", kernel.ptx, re.M)
    assert re.search(rf"^\.target {PER_ARCH_TARGETS[arch]}$", kernel.ptx, re.M)
    assert aot.ptx_version_for(arch) == int(PER_ARCH_ISA[arch].replace(".", ""))


def test_sm_110_needs_triton_3_9():
    from plugins.aot import target_unsupported, triton_version

    reason = target_unsupported(110)
    assert (reason is None) == (triton_version() >= (3, 9)), reason
    if reason:
        assert "Triton >= 3.9" in reason


def test_a_too_old_isa_is_refused_before_llvm_aborts():
    for arch, ptx in ((100, 85), (120, 86), (110, 88), (103, 87)):
        with pytest.raises(ValueError, match=f"sm_{arch} needs PTX ISA"):
            aot.ptx_version_for(arch, ptx)
    assert aot.ptx_version_for(90, None) is None and aot.ptx_version_for(90, 86) == 86


@pytest.mark.parametrize("name", list(RECIPES))
def test_stripped_ptx_assembles(bundle, name, tmp_path):
    """The PTX with Triton's scratch parameters removed is valid: Triton's own ptxas assembles it."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    for arch, target in ((87, "sm_87"), (90, "sm_90a")):
        kernel = compiled(bundle, name, arch, 85)
        source = tmp_path / f"{name}_{arch}.ptx"
        source.write_text(kernel.ptx)
        proc = subprocess.run(
            [str(ptxas), f"--gpu-name={target}", str(source), "-o", str(source.with_suffix(".o"))],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_scratch_parameters_that_are_read_are_not_dropped():
    ptx = ".entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1\n)\n{\n\tld.param.u64 %rd1, [k_param_1];\n}\n"
    with pytest.raises(ValueError, match="reads its parameter k_param_1"):
        aot.strip_unused_params(ptx, "k", 1)
    unused = ptx.replace("[k_param_1]", "[k_param_0]")
    assert ".param .u64 k_param_1" not in aot.strip_unused_params(unused, "k", 1)
    assert aot.strip_unused_params(unused, "k", 2) == unused


def test_launch_parameters_of_the_aot_impl(bundle):
    kernel = compiled(bundle, "TopKDispatch", 90, 85)
    params = aot.launch_params(RECIPES["TopKDispatch"], kernel)
    # [E, G*C, D] rows of 768 in blocks of 8 rows x 256 columns
    assert params["grid"] == ((E * G * C + 7) // 8, 3, 1)
    assert params["block"] == (128, 1, 1)
    assert params["shared"] == kernel.shared
    assert params["scalars"] == (G, S, E, C, D)  # signature order: G, S, E, C, D
    assert list(RECIPES["TopKDispatch"].signature)[:9] == [
        "x_ptr", "slot_token_ptr", "G", "S", "E", "C", "D", "out_ptr", "BLOCK_R",
    ]  # fmt: skip

    route = RECIPES["TopKRoute"]
    params = aot.launch_params(route, compiled(bundle, "TopKRoute", 90, 85))
    # one program per group and block of 64 tokens: 1,576 tokens -> 25 programs per group
    assert params["grid"] == (G, 25, 1) and params["scalars"] == (S, E, C)
    assert route.constexprs == {
        "K": K, "BPR": 1, "BY_TOKEN": 0, "NORM": 0, "EPS": 0.0, "BLOCK_E": 8, "BLOCK_S": 64, "BLOCK_K": 2
    }  # fmt: skip

    combine = aot.launch_params(RECIPES["TopKCombine"], compiled(bundle, "TopKCombine", 90, 85))
    assert combine["grid"] == ((G * S + 7) // 8, 3, 1) and combine["scalars"] == (G, S, K, C, D)

    soft = aot.launch_params(RECIPES["SoftDispatch"], compiled(bundle, "SoftDispatch", 90, 85))
    assert soft["grid"] == (B, 1, 6) and soft["scalars"] == (B, M, N, 1, DS)
    assert RECIPES["SoftDispatch"].constexprs["TF32"] == 1 and RECIPES["SoftCombine"].constexprs["TF32"] == 0


def test_symbolic_sizes_stay_symbolic():
    """The recipe only combines sizes with + - * // (symbolic operand on the left), as TensorRT's ShapeExpr."""

    class Sym:
        def __init__(self, text):
            self.text = text

        def _op(self, sign, other):
            return Sym(f"({self.text}{sign}{getattr(other, 'text', other)})")

        def __add__(self, other):
            return self._op("+", other)

        def __sub__(self, other):
            return self._op("-", other)

        def __mul__(self, other):
            return self._op("*", other)

        def __floordiv__(self, other):
            return self._op("//", other)

    plan = topk_dispatch("float32", Sym("G"), Sym("S"), Sym("D"), Sym("EC"), 8)
    assert plan.grid[0].text == "(((G*((EC//8)*8))+7)//8)"
    assert [getattr(v, "text", v) for v in plan.scalar_values] == ["G", "S", 8, "(EC//8)", "D"]
    assert plan.constexprs == {"BLOCK_R": 8, "BLOCK_D": 256}  # unknown width: 256-column blocks
    route = topk_route(Sym("G"), Sym("S"), 8, 2, 416, 1)  # token blocks of a symbolic group size
    assert route.grid[0].text == "G" and route.grid[1].text == "((S+63)//64)"


def test_precompiled_bundle_lookup(bundle, monkeypatch):
    recipe = RECIPES["TopKCombine"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    # 3 targets at ISA 8.5, sm_90 at the default ISA, the newer PER_ARCH targets (87 and 90 coincide)
    assert len(manifest) == len(RECIPES) * (4 + len(PER_ARCH_ISA) - 2)
    assert len(list(bundle.glob("sm_*/*.ptx"))) == len(manifest)
    loaded = aot.load_precompiled(recipe, 80, 85, bundle)
    assert loaded.name == recipe.kernel and ".target sm_80" in loaded.ptx
    assert aot.load_precompiled(recipe, 87, None, bundle) is None
    other = topk_combine("float16", G, S, K, D, C)  # another variant: not in the bundle
    assert aot.load_precompiled(other, 80, 85, bundle) is None
    monkeypatch.setenv(aot.PTX_DIR_ENV, str(bundle))
    assert aot.compiled_kernel(recipe, arch=80, ptx_version=85) == loaded


def test_compiling_under_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    recipe = RECIPES["TopKDispatch"]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.compile_recipe(recipe, 90)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_register_all_says_tensorrt_is_missing():
    from plugins.register import register_all

    with pytest.raises(RuntimeError, match="TensorRT is not installed"):
        register_all()


NODES = {  # the same launches as RECIPES, described as plugin nodes: input shapes and attributes
    "TopKRoute": ([(G, S, E)], {"k": K, "capacity": C, "batch_priority": 1}, "float32"),
    "TopKDispatch": ([(G, S, D), (G, E * C)], {"num_experts": E}, "float16"),
    "TopKCombine": ([(E, G * C, D), (G, S, K), (G, S, K)], {}, "float32"),
    "SoftRoute": ([(B, M, N)], {}, "float32"),
    "SoftDispatch": ([(B, M, DS), (B, M, N)], {"num_experts": N, "expert_major": 1}, "float16"),
    "SoftCombine": ([(N, B, DS), (B, M, N)], {"num_experts": N, "expert_major": 0}, "float32"),
}


@pytest.mark.parametrize("op", list(NODES))
def test_node_recipes_are_what_aot_impl_asks_for(op):
    """A bundle precompiles ``node_recipes`` from node shapes; the aot_impl builds the same recipe
    from TensorRT's shapes, so the precompiled variant is the one found at build time."""
    shapes, attrs, dtype = NODES[op]
    variants = aot.node_recipes(op, shapes, {**attrs, "plugin_namespace": "moe", "aot": 1})
    assert RECIPES[op].key() in {r.key() for r in variants}
    assert {r.key() for r in variants} == {r.key() for r in aot.node_recipes(op, shapes, attrs)}
    token_dtypes = {"TopKRoute": 1, "SoftRoute": 1}.get(op, 3)  # routers take float32 only
    assert len(variants) == token_dtypes
    chosen = next(r for r in variants if r.key() == RECIPES[op].key())
    assert chosen.grid == RECIPES[op].grid and chosen.scalar_values == RECIPES[op].scalar_values
    assert chosen.inputs[0][1] == dtype
