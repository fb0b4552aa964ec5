"""The MixDQ benchmark's code paths at toy size (the timings themselves are not tested)."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_bench_runs_and_prints_the_keys(capsys):
    import logging

    import bench_mixdq
    import torch

    from lib_sd3 import LOGGER_NAME

    level, threads = logging.getLogger(LOGGER_NAME).level, torch.get_num_threads()
    try:
        assert bench_mixdq.main(["--heads", "1", "--blocks", "1", "--latent", "8", "--steps", "2", "--repeats", "1",
                                 "--tokens", "24", "--threads", "1"]) == 0
    finally:  # the benchmark quiets the extension's logger and sets torch threads: put both back
        logging.getLogger(LOGGER_NAME).setLevel(level)
        torch.set_num_threads(threads)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    values = dict(pair.split("=", 1) for pair in last.split())
    for key in ("w8a8_mem_ratio_1blocks", "w4a8_mem_ratio_1blocks", "w8a8_cosine", "w4a8_cosine", "w8a8_psnr_db",
                "cpu_int8_speedup", "cpu_w4a8_speedup", "fp8_cosine", "cpu_kernel", "cpu_quant_overhead_eager"):
        assert key in values, key
    assert last.split()[-1].startswith("cpu_quant_overhead=")
    assert float(values["fp8_cosine"]) > 0.9
    assert 0 < float(values["w4a8_mem_ratio_1blocks"]) < float(values["w8a8_mem_ratio_1blocks"]) < 1
    assert 0.9 < float(values["w8a8_cosine"]) <= 1.0


def test_cuda_padding_plan_for_sd3_small_m_layers():
    """The CUDA path's shape decisions for SD3 Medium's Linears, checked without a GPU."""
    from lib_sd3.mixdq import kernels, shipped

    plans = {name: kernels.plan_int_mm(2 if "adaLN" in name or "embedder" in name else 4250, k, n, "cuda")
             for name, (n, k) in shipped.sd3_medium_linears().items()}
    assert plans["joint_blocks.0.x_block.adaLN_modulation.1"] == "pad_rows"
    assert plans["joint_blocks.0.x_block.mlp.fc2"] == "int_mm"
    assert "fallback" not in plans.values()  # every SD3 Medium Linear has K, N multiples of 8


def test_large_memory_is_the_sum_of_the_layer_sizes():
    """``large_w8a8_gb`` / ``large_w4a8_gb`` (SD3.5 Large, 38 blocks, qk-norm): the diffusers model on the meta
    device, quantized, weighs exactly fp16 minus what each configured Linear of SD3.5 Large's layer list saves."""
    import bench_mixdq
    import torch

    from lib_sd3.mixdq import config, shipped
    from lib_sd3.mixdq.qlinear import layer_bytes

    shapes = shipped.sd35_large_linears()
    for kind in ("w8a8", "w4a8"):
        before, after = bench_mixdq.meta_bytes(kind, bench_mixdq.SD35_LARGE)
        plan = shipped.preset(kind, shapes).weight
        saved = sum(layer_bytes(n, k, 16, True, torch.float16) - layer_bytes(n, k, plan[name], True, torch.float16)
                    for name, (n, k) in shapes.items() if name in plan)
        assert after == before - saved
        assert config.load(kind).weight  # the shipped pattern file is what meta_bytes applied
    assert bench_mixdq.meta_bytes("w8a8", bench_mixdq.SD35_LARGE)[1] / 2**30 < 8.5  # the goals
    assert bench_mixdq.meta_bytes("w4a8", bench_mixdq.SD35_LARGE)[1] / 2**30 < 5.0


def test_gpu_step_and_memory_figures_on_cpu():
    """The ``--device cuda`` headline code (step ratios, allocated-memory ratios), run on CPU at toy size."""
    import bench_mixdq
    import torch

    from lib_sd3.mixdq import layers, shipped

    m = bench_mixdq.transformer(1, 1, 8, "cpu", torch.float32)
    names = [n for n, _ in layers.linear_layers(m)]
    configs = {kind: shipped.preset(kind, names) for kind in ("w8a8", "w4a8", "fp8")}
    out = bench_mixdq.step_and_memory(m, bench_mixdq.inputs(m, 8, 1, "cpu", torch.float32), configs, 1)
    assert set(out) >= {"gpu_w8a8_step_ratio", "gpu_fp8_step_ratio", "gpu_w8a8_mem_ratio", "gpu_w4a8_mem_ratio",
                        "cpu_step_ms_float", "cpu_step_ms_fp8"}
    assert 0 < out["gpu_w4a8_mem_ratio"] < out["gpu_w8a8_mem_ratio"] < 1
    assert out["gpu_w8a8_step_ratio"] > 0 and out["gpu_fp8_step_ratio"] > 0
