//! Faults: a run killed (SIGKILL) at any moment — inside a step, a checkpoint write or the final
//! save — resumes with `--resume-from-checkpoint latest` to the adapter an uninterrupted run
//! writes, byte for byte; a half-written checkpoint is never taken as the latest.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

/// The arguments of the run under test: 6 steps, a checkpoint after every step.
fn args(out: &Path) -> Vec<String> {
    let out = out.to_str().unwrap().to_string();
    let mut args: Vec<String> = train_args("cpu", &out, "6", &["--save-steps", "1"])
        .into_iter()
        .map(String::from)
        .collect();
    args.extend(["--lora-dropout", "0.1"].map(String::from));
    args
}

fn spawn(args: &[String]) -> std::process::Child {
    Command::new(bin())
        .args(args)
        .current_dir(repo())
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run peft-sft")
}

#[test]
fn a_run_killed_at_twenty_moments_resumes_to_the_same_adapter_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("reference");
    let started = Instant::now();
    let status = spawn(&args(&reference)).wait().unwrap();
    assert!(status.success());
    let whole = started.elapsed();
    let want = std::fs::read(reference.join("adapter_model.safetensors")).unwrap();
    // Kill moments spread over the whole run (start-up, steps, checkpoint writes, final save),
    // shuffled by a fixed seed.
    let mut rng = peft_sft::rng::Rng::new(21);
    let mut interrupted = 0;
    for i in 0..20 {
        let out = tmp.path().join(format!("killed-{i}"));
        let at = whole.mul_f64(rng.uniform(0.05, 1.0));
        let mut child = spawn(&args(&out));
        std::thread::sleep(at);
        let _ = child.kill();
        child.wait().unwrap();
        if !out.join("adapter_model.safetensors").exists() {
            interrupted += 1;
        }
        let mut resume = args(&out);
        let has_checkpoint = std::fs::read_dir(&out).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("checkpoint-") && e.path().join("trainer_state.json").exists()
            })
        });
        if has_checkpoint {
            resume.extend(["--resume-from-checkpoint", "latest"].map(String::from));
        }
        let status = spawn(&resume).wait().unwrap();
        assert!(
            status.success(),
            "moment {i} ({at:?}): the resumed run failed"
        );
        let got = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        assert!(
            got == want,
            "moment {i} ({at:?} of {whole:?}): the resumed adapter differs from the uninterrupted run's"
        );
    }
    // Most kills landed before the run's end (the rest test resuming a finished run).
    assert!(
        interrupted >= 10,
        "only {interrupted} of 20 kills interrupted the run"
    );
}

#[test]
fn a_half_written_checkpoint_is_never_the_latest() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut first = args(&out);
    let steps = first.iter().position(|a| a == "6").unwrap();
    first[steps] = "2".into();
    assert!(spawn(&first).wait().unwrap().success());
    // What a kill inside a checkpoint write leaves: the temporary folder, and a checkpoint folder
    // without its state file.
    std::fs::create_dir_all(out.join(".checkpoint-3.tmp")).unwrap();
    std::fs::write(
        out.join(".checkpoint-3.tmp/adapter_model.safetensors"),
        b"partial",
    )
    .unwrap();
    std::fs::create_dir_all(out.join("checkpoint-4")).unwrap();
    std::fs::write(
        out.join("checkpoint-4/adapter_model.safetensors"),
        b"partial",
    )
    .unwrap();
    let mut resume = args(&out);
    resume.extend(["--resume-from-checkpoint", "latest"].map(String::from));
    assert!(spawn(&resume).wait().unwrap().success());
    let reference = tmp.path().join("reference");
    assert!(spawn(&args(&reference)).wait().unwrap().success());
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(reference.join("adapter_model.safetensors")).unwrap(),
        "resumed from checkpoint-2, not the half-written ones"
    );
}

#[test]
fn a_full_disk_stops_the_run_naming_the_file_and_leaves_a_resumable_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (mnt, copy) = (tmp.path().join("mnt"), tmp.path().join("copy"));
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&copy).unwrap();
    // The output folder on a 1 MiB tmpfs in a private mount namespace (no root needed); what the
    // run left there is copied out before the namespace goes.
    let mut run: Vec<String> = vec![bin().to_string()];
    run.extend(
        args(&mnt)
            .into_iter()
            .map(|a| if a == "6" { "200".into() } else { a }),
    );
    let script = format!(
        "mount -t tmpfs -o size=1m tmpfs {m} || exit 99; {run}; rc=$?; cp -a {m}/. {c}/; exit $rc",
        m = mnt.display(),
        c = copy.display(),
        run = run.join(" ")
    );
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .current_dir(repo())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run unshare");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(99),
        "cannot mount a tmpfs in a user namespace here (unshare -rm): {err}"
    );
    assert!(
        !out.status.success(),
        "the run filled 1 MiB without failing"
    );
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("no space left on the device"),
        "{err}"
    );
    // A checkpoint that does not fit says about how much it needs.
    if last.contains("/checkpoint-") {
        assert!(
            last.contains("MiB, as much as the previous checkpoint"),
            "{last}"
        );
    }
    // Nothing half-written stays, and the newest complete checkpoint resumes elsewhere.
    let mut stack = vec![copy.clone()];
    let mut checkpoints = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(!name.contains(".tmp"), "a partial file was left: {name}");
            if entry.path().is_dir() {
                checkpoints += usize::from(entry.path().join("trainer_state.json").exists());
                stack.push(entry.path());
            }
        }
    }
    assert!(
        checkpoints > 0,
        "no complete checkpoint before the disk filled"
    );
    let mut resume: Vec<String> = args(&copy)
        .into_iter()
        .map(|a| if a == "6" { "200".into() } else { a })
        .collect();
    resume.extend(
        [
            "--save-total-limit",
            "1",
            "--resume-from-checkpoint",
            "latest",
        ]
        .map(String::from),
    );
    assert!(
        spawn(&resume).wait().unwrap().success(),
        "the checkpoint did not resume"
    );
}
