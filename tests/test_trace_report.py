"""bench/trace_report.py: GPU time and GPU idle time tied to the code that launched them."""
import gzip
import json

from bench.trace_report import load, report

MAIN, AUTOGRAD = 1, 2


def span(cat, name, tid, start, end, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": tid, "ts": start, "dur": end - start, "args": args}


def launch(tid, at, correlation):
    return span("cuda_runtime", "cudaLaunchKernel", tid, at, at + 2, correlation=correlation)


def kernel(name, start, end, correlation):
    return span("kernel", name, 7, start, end, correlation=correlation)


def step_trace():
    """Forward on the main thread (attention, then a norm after a host sync that idles the GPU for 300 us),
    backward on the autograd thread (a copy launched by a frame outside the named packages)."""
    return {"traceEvents": [
        span("python_function", "bench/bench_train.py(160): main", MAIN, 0, 1000),
        span("python_function", "/x/site-packages/ds_longctx/attention/chunked.py(40): forward", MAIN, 10, 90),
        span("cpu_op", "aten::_scaled_dot_product_cudnn_attention", MAIN, 20, 80),
        launch(MAIN, 30, correlation=1),
        kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 100, 200, correlation=1),
        span("cuda_runtime", "cudaStreamSynchronize", MAIN, 95, 480),
        span("python_function", "/x/site-packages/transformers/models/llama/modeling_llama.py(70): forward",
             MAIN, 485, 520),
        launch(MAIN, 490, correlation=2),
        kernel("triton_red_fused_rms_norm", 500, 600, correlation=2),
        span("python_function", "torch/autograd/function.py(300): apply", AUTOGRAD, 600, 700),
        launch(AUTOGRAD, 610, correlation=3),
        kernel("void at::native::direct_copy_kernel_cuda", 620, 640, correlation=3),
        launch(AUTOGRAD, 650, correlation=4),
        kernel("nvjet_sm90_gemm", 660, 760, correlation=4),
    ]}


def test_every_kernel_is_summed_under_the_site_that_launched_it():
    record = report(step_trace())
    rows = {(r["class"], r["site"]): r["seconds"] for r in record["gpu_seconds_by_site"]}
    assert rows[("attention", "ds_longctx/attention/chunked.py(40): forward <- bench/bench_train.py(160): main")] \
        == 100e-6
    assert rows[("other", "transformers/models/llama/modeling_llama.py(70): forward <- "
                 "bench/bench_train.py(160): main")] == 100e-6
    # no frame of the named packages open on that thread: the innermost frame stands for the site
    assert rows[("other", "torch/autograd/function.py(300): apply")] == 20e-6
    assert rows[("matmul", "torch/autograd/function.py(300): apply")] == 100e-6


def test_idling_is_charged_to_the_launch_that_ended_it_and_the_host_call_that_blocked():
    record = report(step_trace(), min_gap_us=50)
    assert record["idle_by_site"] == [{
        "ended_by": "transformers/models/llama/modeling_llama.py(70): forward <- bench/bench_train.py(160): main",
        "host_blocked_in": "cudaStreamSynchronize", "seconds": 300e-6, "count": 1}]
    # the 20 us before the copy and before the matmul are launch overhead, summed apart
    assert record["idle_short"] == {"seconds": 40e-6, "count": 2, "under_us": 50}
    assert record["idle_seconds"] == 340e-6


def test_host_copies_do_not_count_as_the_gpu_working():
    trace = step_trace()
    trace["traceEvents"].append(span("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 8, 200, 500, correlation=9))
    assert report(trace)["idle_seconds"] == 340e-6


def test_a_gzipped_trace_reads_as_the_plain_one(tmp_path):
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(step_trace(), f)
    assert report(load(str(path))) == report(step_trace())
