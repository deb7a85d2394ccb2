#!/usr/bin/env python3
"""The GPU checks, driven by scripts/gpu-check.sh on the GPU machine (see there for the command).

Sections, each recorded in $OUT/gpu-report.json whatever the others do (a failing section does not stop the
next; the exit status is non-zero when any failed):
  env        GPU, driver, CUDA libraries found, tool versions
  tests      the CUDA correctness tests (tests/gpu.rs: fixtures' logits, PEFT loss and gradients, QLoRA vs
             bitsandbytes, checkpointed stack = op by op, chatml rows, merge/generate/eval/20 training steps
             CUDA = CPU), log in $OUT/tests.log
  side       side by side with HF transformers + PEFT (SDPA, bf16, batch 1, random weights of the same shapes):
             SmolLM2-1.7B LoRA r=16 T=2048 with and without gradient checkpointing; Llama-3.1-8B QLoRA r=32
             with checkpointing at T=2048 and 8192. Peak GPU memory for both from the same NVML sampler over
             the timed steps' window, minus the memory in use before the process started.
  fit16      Llama-3.1-8B QLoRA r=32 batch 1 with checkpointing (and with offloaded layer inputs): measured
             peaks at growing lengths, the largest measured length within 16 GiB, and `peft-sft plan`'s
             prediction for each measured length (error in %) and its own largest length.
Every subprocess has a time limit; a section that would pass the overall deadline is recorded as skipped.
"""
import json
import os
import re
import subprocess
import sys
import threading
import time

OUT = os.environ.get("OUT") or "/tmp/gpu-check-out"
WORK = os.environ["PEFT_SFT_GPU_WORK"]  # unpacked bundle
REPO = os.getcwd()
START = time.time()
BUDGET = float(os.environ.get("GPU_CHECK_BUDGET_S", "470"))
BIN = f"{WORK}/peft-sft"
BENCH = f"{WORK}/bench_lora_step"
TESTS = f"{WORK}/gpu-tests"
SMOL_17B = os.environ.get("GPU_CHECK_SMALL_CONFIG", f"{REPO}/tests/fixtures/configs/smollm2-1.7b.json")
LLAMA_8B = os.environ.get("GPU_CHECK_BIG_CONFIG", f"{REPO}/tests/fixtures/configs/llama-3.1-8b.json")
# cuda; cpu with small configs tries this script without a GPU (GPU_CHECK_LENGTHS=a,b,c,d shrinks
# every length list to those).
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
LENGTHS = os.environ.get("GPU_CHECK_LENGTHS")
GIB16 = 16 * 1024

report = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(START)), "sections": {}}


def left():
    return BUDGET - (time.time() - START)


def save():
    report["elapsed_s"] = round(time.time() - START, 1)
    with open(f"{OUT}/gpu-report.json", "w") as f:
        json.dump(report, f, indent=1)


def log(msg):
    print(f"[{time.time() - START:6.1f}s] {msg}", flush=True)


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception as e:  # noqa: BLE001 - the environment report records what failed
        return f"({e})"


class Memory:
    """Samples the GPU's used memory (NVML; nvidia-smi when pynvml is missing) every few ms."""

    def __init__(self):
        self.samples = []
        self.stop = threading.Event()
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.read = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
            self.source = "nvml"
        except Exception:  # noqa: BLE001
            self.read = lambda: float(sh("nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits"))
            self.source = "nvidia-smi"

    def __enter__(self):
        try:
            self.baseline = self.read()
        except Exception:  # noqa: BLE001
            self.baseline = 0.0
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()
        return self

    def loop(self):
        while not self.stop.is_set():
            try:
                self.samples.append((time.time(), self.read()))
            except Exception:  # noqa: BLE001 - no reading this time; the peak is then None
                pass
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def peak(self, start=None, end=None):
        window = [m for t, m in self.samples if (start is None or t >= start) and (end is None or t <= end)]
        return round(max(window) - self.baseline, 1) if window else None


def run_measured(name, cmd, env=None, timeout=240):
    """Runs cmd (a list), sampling GPU memory; returns the JSON records it printed, each with
    gpu_peak_mib (over its timed window) added, and the whole run's peak."""
    log(f"{name}: {' '.join(cmd)}")
    full_env = dict(os.environ, **(env or {}))
    with Memory() as mem:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
            out, err, rc = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out, err, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), \
                f"timed out after {timeout}s", 124
    with open(f"{OUT}/bench.log", "a") as f:
        f.write(f"=== {name}: {' '.join(cmd)} (rc {rc})\n{out}\n{err[-4000:]}\n")
    records = []
    for line in out.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            if "timed_start" in r:
                r["gpu_peak_mib"] = mem.peak(r["timed_start"], r["timed_end"])
            r.pop("step_seconds_all", None)
            records.append(r)
    return {"rc": rc, "records": records, "process_peak_mib": mem.peak(), "memory_source": mem.source,
            "stderr_tail": err[-600:] if rc else ""}


def section(name, fn, needs_s):
    if left() < needs_s:
        report["sections"][name] = {"status": "skipped", "why": f"{left():.0f}s left, needs ~{needs_s}s"}
        log(f"{name}: skipped (time)")
        save()
        return
    t0 = time.time()
    try:
        result = fn()
        result.setdefault("status", "pass")
    except Exception as e:  # noqa: BLE001 - recorded, the next section runs
        result = {"status": "fail", "error": repr(e)}
    result["seconds"] = round(time.time() - t0, 1)
    report["sections"][name] = result
    log(f"{name}: {result['status']} ({result['seconds']}s)")
    save()


def env_section():
    libs = sorted({os.path.basename(p) for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d
                   and os.path.isdir(d) for p in os.listdir(d)
                   if re.match(r"lib(cuda|cudart|cublas|cublasLt|curand|nvrtc|nvJitLink)\b.*\.so", p)})
    info = {
        "gpu": sh("nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader"),
        "cuda_libraries_on_path": libs,
        "ld_library_path": os.environ.get("LD_LIBRARY_PATH", ""),
        "libcuda": sh("ldconfig -p | grep -m2 libcuda.so"),
        "python": sh("python3 -c 'import torch, transformers, peft, sys; print(sys.version.split()[0], torch.__version__, "
                     "torch.version.cuda, transformers.__version__, peft.__version__)'"),
        "bitsandbytes": sh("python3 -c 'import bitsandbytes as b; print(b.__version__)' 2>&1 | tail -1"),
        "bundle": open(f"{WORK}/commit.txt").read().strip() if os.path.exists(f"{WORK}/commit.txt") else "?",
        "cpu": sh("nproc"),
    }
    device = subprocess.run([BIN, "generate", "--model", "tests/fixtures/models/qwen2", "--prompt", "hi",
                             "--max-new-tokens", "2", "--device", "cuda"], capture_output=True, text=True,
                            timeout=120)
    info["peft_sft_on_cuda"] = "ok" if device.returncode == 0 else device.stderr[-800:]
    for k, v in info.items():
        log(f"  {k}: {v}")
    return {"status": "pass" if device.returncode == 0 else "fail", **info}


def tests_section():
    env = dict(os.environ, PEFT_SFT_TEST_DEVICE="cuda", PEFT_SFT_REPO=REPO, PEFT_SFT_BIN=BIN, RUST_BACKTRACE="1")
    threads = os.environ.get("GPU_TEST_THREADS", "4")
    try:
        p = subprocess.run([TESTS, "--test-threads", threads], capture_output=True, text=True, env=env,
                           timeout=max(60, min(300, left() - 200)))
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = ((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")) + \
            "\nTIMED OUT", 124
    with open(f"{OUT}/tests.log", "w") as f:
        f.write(out)
    results = dict(re.findall(r"^test (\S+) \.\.\. (ok|FAILED|ignored)", out, re.M))
    failed = [t for t, r in results.items() if r == "FAILED"]
    summary = re.findall(r"^test result: .*$", out, re.M)
    for t, r in sorted(results.items()):
        log(f"  {r:6} {t}")
    return {"status": "pass" if rc == 0 else "fail", "rc": rc, "passed": sum(r == "ok" for r in results.values()),
            "failed": failed, "summary": summary}


def ours(config, lens, rank, mode, steps=2, timeout=240):
    if LENGTHS:
        lens = ",".join(LENGTHS.split(",")[:len(lens.split(","))])
    return run_measured(f"peft-sft {mode} {lens}", [BENCH, config, lens, str(steps), str(rank), mode],
                        env={"DEVICE": DEVICE, "DTYPE": "bf16"}, timeout=timeout)


def hf(config, seq_len, rank, qlora=False, gc=False, steps=2, timeout=240):
    if LENGTHS:
        seq_len = int(LENGTHS.split(",")[0 if seq_len <= 2048 else 1])
    cmd = [sys.executable, f"{REPO}/scripts/bench_peft_gpu.py", "--config", config, "--seq-len", str(seq_len),
           "--lora-r", str(rank), "--steps", str(steps), "--device", DEVICE]
    cmd += ["--qlora"] * qlora + ["--gradient-checkpointing"] * gc
    return run_measured(f"hf+peft {seq_len} qlora={qlora} gc={gc}", cmd, timeout=timeout)


def brief(run):
    return [{k: r.get(k) for k in ("impl", "seq_len", "tokens_per_second", "step_seconds", "gpu_peak_mib",
                                   "torch_max_reserved_mib", "torch_max_allocated_mib", "loss", "load_seconds",
                                   "error")} for r in run["records"]] or [{"rc": run["rc"], "stderr": run["stderr_tail"]}]


def side_section():
    rows = {}
    ok = True
    for gc in (False, True):
        mode = "lora+gc" if gc else "lora"
        a = ours(SMOL_17B, "2048", 16, mode)
        b = hf(SMOL_17B, 2048, 16, gc=gc)
        rows[f"smollm2-1.7b lora r16 T2048{' gc' if gc else ''}"] = {"peft-sft": brief(a), "hf+peft": brief(b)}
        ok &= a["rc"] == 0 and b["rc"] == 0
        save()
    if left() > 150:
        a = ours(LLAMA_8B, "2048,8192", 32, "qlora+gc", timeout=int(min(300, left() - 60)))
        b = hf(LLAMA_8B, 2048, 32, qlora=True, gc=True, timeout=int(min(200, left() - 60)))
        c = hf(LLAMA_8B, 8192, 32, qlora=True, gc=True, timeout=int(min(200, left() - 60))) if left() > 90 else None
        rows["llama-3.1-8b qlora r32 gc"] = {"peft-sft": brief(a), "hf+peft": brief(b) + (brief(c) if c else [])}
        ok &= a["rc"] == 0 and b["rc"] == 0
    for k, v in rows.items():
        for impl, recs in v.items():
            for r in recs:
                log(f"  {k} {impl}: T={r.get('seq_len')} {r.get('tokens_per_second') or 0:.0f} tok/s, "
                    f"peak {r.get('gpu_peak_mib')} MiB {r.get('error') or ''}")
    return {"status": "pass" if ok else "fail", "rows": rows}


def plan(seq_len, offload):
    cmd = [BIN, "plan", "--model", LLAMA_8B, "--qlora", "--lora-r", "32", "--max-length", str(seq_len),
           "--per-device-train-batch-size", "1", "--gradient-checkpointing", "--device", "cuda", "--budget-gib", "16",
           "--json"] + ["--offload-activations"] * offload
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return json.loads(p.stdout) if p.returncode == 0 else {"error": p.stderr[-400:]}


def fit_section():
    out = {}
    ok = True
    for offload in (False, True):
        mode = "qlora+gc+offload" if offload else "qlora+gc"
        # Around the plan's 16 GiB lengths (20,385 with checkpointing, 45,283 offloaded); one
        # step per length (its peak is the step's), longest last.
        lens = "24576,36864,45056,53248" if offload else "12288,16384,20480,24576"
        if left() < 120:
            out[mode] = {"status": "skipped", "why": f"{left():.0f}s left"}
            continue
        run = ours(LLAMA_8B, lens, 32, mode, steps=0, timeout=int(min(300, left() - 30)))
        points = []
        for r in run["records"]:
            p = plan(r["seq_len"], offload)
            predicted = p.get("total_mib")
            measured = r.get("gpu_peak_mib")
            points.append({"seq_len": r["seq_len"], "measured_mib": measured, "plan_mib": predicted,
                           "plan_error_pct": round(100 * (predicted - measured) / measured, 1)
                           if predicted and measured else None,
                           "tokens_per_second": r.get("tokens_per_second"), "error": r.get("error")})
        within = [p["seq_len"] for p in points if p["measured_mib"] and p["measured_mib"] <= GIB16 and not p["error"]]
        largest_plan = plan(8192, offload).get("largest_max_length")
        out[mode] = {"points": points, "largest_measured_within_16gib": max(within) if within else None,
                     "plan_largest_max_length": largest_plan, "rc": run["rc"]}
        ok &= run["rc"] == 0
        for p in points:
            log(f"  {mode} T={p['seq_len']}: measured {p['measured_mib']} MiB, plan {p['plan_mib']} MiB "
                f"({p['plan_error_pct']}%)")
        save()
    return {"status": "pass" if ok else "fail", **out}


def main():
    os.makedirs(OUT, exist_ok=True)
    open(f"{OUT}/bench.log", "w").close()
    only = set(filter(None, os.environ.get("GPU_CHECK_ONLY", "").split(",")))
    for name, fn, needs in (("env", env_section, 10), ("tests", tests_section, 60), ("side", side_section, 90),
                            ("fit16", fit_section, 120)):
        if not only or name in only:
            section(name, fn, needs)
    failed = [n for n, s in report["sections"].items() if s["status"] == "fail"]
    report["failed"] = failed
    save()
    log(f"done: {'FAILED ' + ', '.join(failed) if failed else 'all sections passed or skipped'}; "
        f"report in {OUT}/gpu-report.json")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
