"""bench/step_profile.py: a profiled step's busy, idle and exposed-copy seconds from GPU activity intervals."""
from bench.step_profile import exposed_seconds, kernel_class, summarize, union_seconds


def test_overlapping_kernels_count_once_in_the_busy_time():
    assert union_seconds([(0, 1e6), (5e5, 1.5e6), (3e6, 4e6)]) == 2.5


def test_a_copy_under_a_kernel_is_hidden_and_one_alone_is_exposed():
    compute = [(0.0, 1e6)]
    assert exposed_seconds([(2e5, 8e5)], compute) == 0.0
    assert exposed_seconds([(5e5, 2e6)], compute) == 1.0


def test_kernels_are_classed_by_name():
    assert kernel_class("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3") == "attention"
    assert kernel_class("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NTT") == "matmul"
    assert kernel_class("Memcpy HtoD (Pinned -> Device)") == "copy_h2d"
    assert kernel_class("Memcpy DtoH (Device -> Pinned)") == "copy_d2h"
    assert kernel_class("Memcpy DtoD (Device -> Device)") == "copy_d2d"
    assert kernel_class("void at::native::vectorized_elementwise_kernel<4, ...>") == "other"


def test_the_summary_splits_a_step_into_busy_idle_and_classes():
    events = [("sm90_xmma_gemm_bf16", 0.0, 2e6), ("fmha_fwd", 2e6, 5e6),
              ("Memcpy DtoH (Device -> Pinned)", 4e6, 6e6), ("elementwise", 7e6, 7.5e6)]
    s = summarize(events, wall_s=8.0)
    assert s["gpu_busy_s"] == 5.5 and s["gpu_idle_s"] == 2.5
    assert s["class_s"] == {"attention": 3.0, "copy_d2h": 2.0, "matmul": 2.0, "other": 0.5}
    assert s["exposed_copy_s"] == 1.0
    assert s["top_kernels"][0] == {"name": "fmha_fwd", "seconds": 3.0, "calls": 1}
