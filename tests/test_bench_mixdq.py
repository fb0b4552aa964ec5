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
                "cpu_int8_speedup", "cpu_w4a8_speedup"):
        assert key in values, key
    assert 0 < float(values["w4a8_mem_ratio_1blocks"]) < float(values["w8a8_mem_ratio_1blocks"]) < 1
    assert 0.9 < float(values["w8a8_cosine"]) <= 1.0


def test_cuda_padding_plan_for_sd3_small_m_layers():
    """The CUDA path's shape decisions for SD3 Medium's Linears, checked without a GPU."""
    from lib_sd3.mixdq import kernels, presets

    plans = {name: kernels.plan_int_mm(2 if "adaLN" in name or "embedder" in name else 4250, k, n, "cuda")
             for name, (n, k) in presets.sd3_medium_linears().items()}
    assert plans["joint_blocks.0.x_block.adaLN_modulation.1"] == "pad_rows"
    assert plans["joint_blocks.0.x_block.mlp.fc2"] == "int_mm"
    assert "fallback" not in plans.values()  # every SD3 Medium Linear has K, N multiples of 8
