"""Ahead-of-time compile of the fused kernels: registers, spills and shared memory per kernel, size and GPU.

Triton compiles a kernel for a GPU it does not have: given the argument types, the constexprs and a target,
``triton.compile`` runs its own LLVM and the ``ptxas`` of its NVIDIA backend, whose ``-v`` report gives the
registers per thread and the bytes of spill stores and loads. :func:`compile_kernel` compiles one
configuration exactly as the launchers (:func:`covpool.kernels.fused_iteration.fused_coupled_root`,
:func:`covpool.kernels.fused_lyapunov.fused_solve_lyapunov`) launch it, at their
:func:`covpool.kernels.fused_iteration.launch_config`; :func:`table` does so for every tile the planner
dispatches (up to :data:`covpool.kernels.MAX_N`) on sm_80, sm_90 and sm_100. ``tests/test_kernels_aot.py``
asserts no spills; ``.ci/gpu`` prints the table beside the run on a GPU.

Run ``python -m covpool.kernels.aot`` (``--precision ieee`` for IEEE products, ``--arch 90`` for one GPU,
``--jobs 8`` to compile in 8 processes) to print the table (about two minutes a precision on one core).
Needs Triton 3.8 (its compile API and knobs); nothing here needs a GPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import multiprocessing
import re
from dataclasses import dataclass

from covpool.kernels import MAX_N
from covpool.kernels.fused_iteration import INPUT_PRECISION, MAX_REGISTERS, launch_config, tile_size

ARCHS = (80, 90, 100)
"""Compute capabilities compiled for: A100 (sm_80), H100 (sm_90), B200 (sm_100)."""
KERNELS = ("polynomial", "pade", "sign")
"""The forward kernel with polynomial steps, with Padé steps, and the sign iteration."""
TENSOR_CORE_OPS = ("mma.sync", "wgmma.mma_async", "tcgen05.mma")
"""The PTX of tensor-core products: Ampere's warp-level MMA, Hopper's warpgroup MMA, Blackwell's."""

_POINTERS = "*fp32"
_SIGNATURES = {
    "polynomial": (
        "coupled_root_kernel",
        ("A", "Y_out", "Z_out", "table", "scratch"),
        ("n", "num_steps", "width", "degree"),
    ),
    "sign": ("sign_iteration_kernel", ("Y", "C_in", "X_out", "table", "scratch"), ("n", "num_steps")),
}
_SIGNATURES["pade"] = _SIGNATURES["polynomial"]


@dataclass(frozen=True)
class Compiled:
    """One kernel compiled for one tile, GPU and product precision."""

    kernel: str
    block: int
    arch: int
    precision: str
    num_warps: int
    block_k: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    tensor_cores: tuple[str, ...]
    """Which of :data:`TENSOR_CORE_OPS` the PTX holds."""

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def dispatched_tiles() -> tuple[int, ...]:
    """The tiles of every ``n`` the planner sends to the kernels, ``1 … MAX_N``."""
    return tuple(sorted({tile_size(n) for n in range(1, MAX_N + 1)}))


def _ptxas_report(log: str) -> tuple[int, int, int]:
    """``(registers, spill store bytes, spill load bytes)`` from ``ptxas -v``'s report of one kernel."""
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return registers, int(spills.group(1)), int(spills.group(2))


def compile_kernel(
    kernel: str,
    block: int,
    arch: int,
    precision: str = INPUT_PRECISION,
    config: tuple[int, ...] | None = None,
) -> Compiled:
    """Compile ``kernel`` (one of :data:`KERNELS`) at tile ``block`` for ``sm_<arch>`` with products at
    ``precision``, with the argument types, constexprs, warps and stages its launcher passes (or
    ``config``, ``(BLOCK, BLOCK_K, num_warps, num_stages)``, to try another); no cache is read, so ``ptxas``
    always reports."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from covpool.kernels import triton_iteration, triton_lyapunov

    name, pointers, integers = _SIGNATURES[kernel]
    fn = getattr(triton_iteration, name, None) or getattr(triton_lyapunov, name)
    _, block_k, warps, stages = config or launch_config(block)
    constexprs = {"BLOCK": block, "BLOCK_K": block_k, "INPUT_PRECISION": precision}
    if kernel != "sign":
        constexprs["PADE"] = kernel == "pade"
    signature = dict.fromkeys(pointers, _POINTERS) | dict.fromkeys(integers, "i32")
    signature |= dict.fromkeys(constexprs, "constexpr")
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # make_cubin prints ptxas's report
            compiled = triton.compile(
                source,
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": warps, "num_stages": stages, "maxnreg": MAX_REGISTERS},
            )
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
    registers, stores, loads = _ptxas_report(log.getvalue())
    ptx = compiled.asm["ptx"]
    return Compiled(
        kernel=kernel,
        block=block,
        arch=arch,
        precision=precision,
        num_warps=warps,
        block_k=block_k,
        registers=registers,
        spill_stores=stores,
        spill_loads=loads,
        shared=compiled.metadata.shared,
        tensor_cores=tuple(op for op in TENSOR_CORE_OPS if op in ptx),
    )


def table(
    precisions: tuple[str, ...] = (INPUT_PRECISION,), archs: tuple[int, ...] = ARCHS, jobs: int = 1
) -> list[Compiled]:
    """:func:`compile_kernel` for every kernel, dispatched tile, GPU and precision, in that order; in
    ``jobs`` processes where ``jobs > 1`` (spawned: a compile swaps Triton's knobs and stdout for its
    report, which are process-wide)."""
    configurations = [
        (kernel, block, arch, precision)
        for precision in precisions
        for kernel in KERNELS
        for block in dispatched_tiles()
        for arch in archs
    ]
    if jobs <= 1:
        return [compile_kernel(*configuration) for configuration in configurations]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        return list(pool.map(compile_kernel, *zip(*configurations, strict=True)))


def format_table(rows: list[Compiled]) -> str:
    """A Markdown table of ``rows``, one line each."""
    lines = [
        "| kernel | tile | arch | products | warps | BLOCK_K | registers | spill stores / loads (bytes) "
        "| shared (bytes) | tensor-core PTX |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.kernel} | {row.block} | sm_{row.arch} | {row.precision} | {row.num_warps} | "
            f"{row.block_k} | {row.registers} | {row.spill_stores} / {row.spill_loads} | {row.shared} | "
            f"{', '.join(row.tensor_cores) or 'none'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--precision", action="append", help=f"tl.dot input_precision (default {INPUT_PRECISION})"
    )
    parser.add_argument(
        "--arch", action="append", type=int, help="compute capability ×10 (default 80, 90, 100)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    args = parser.parse_args(argv)
    rows = table(tuple(args.precision or (INPUT_PRECISION,)), tuple(args.arch or ARCHS), args.jobs)
    print(format_table(rows))
    spilled = [row for row in rows if row.spills]
    print(f"{len(rows)} configurations compiled, {len(spilled)} with spills")


if __name__ == "__main__":
    main()
