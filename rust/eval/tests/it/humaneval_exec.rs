//! HumanEval execution for real: Python processes, the timeout, the network sandbox, and the
//! published data set's canonical solutions.

use std::io::Read;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uhlm_eval::humaneval::{
    Executor, Problem, Sandbox, fetch_problems, humaneval_spec, load_problems,
};

fn tiny_problem() -> Problem {
    Problem {
        task_id: "Tiny/0".into(),
        prompt: "import math\n\ndef double(x):\n    \"\"\"Twice x.\"\"\"\n".into(),
        canonical_solution: "    return 2 * x\n".into(),
        test:
            "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-1) == -2\n"
                .into(),
        entry_point: "double".into(),
    }
}

fn executor() -> Executor {
    let mut ex = Executor::new().expect("python3 must be available for these tests");
    ex.timeout = Duration::from_secs(2);
    ex
}

#[test]
fn right_wrong_and_endless_completions() {
    let ex = executor();
    let p = tiny_problem();

    let ok = ex.check(&p, &p.canonical_solution);
    assert!(ok.passed, "{ok:?}");
    assert_eq!(ok.result, "passed");

    let wrong = ex.check(&p, "    return x + 1\n");
    assert!(!wrong.passed);
    assert!(
        wrong.result.starts_with("failed: AssertionError"),
        "{wrong:?}"
    );
    // The traceback names the program's own line (no prelude shifting it).
    assert!(wrong.stderr.contains("line 8"), "{}", wrong.stderr);

    let syntax = ex.check(&p, "    return (\n");
    assert!(!syntax.passed);
    assert!(
        syntax.result.starts_with("failed: SyntaxError"),
        "{syntax:?}"
    );

    // A redefinition after the prompt (what chat replies become) uses the prompt's import.
    let redefined = ex.check(&p, "\ndef double(x):\n    return int(math.fsum([x, x]))\n");
    assert!(redefined.passed, "{redefined:?}");

    // Exiting early without running the tests is not a pass.
    let exited = ex.check(&p, "    return 2 * x\nimport os\nos._exit(0)\n");
    assert!(!exited.passed, "{exited:?}");

    let started = Instant::now();
    let endless = ex.check(&p, "    while True:\n        pass\n");
    let took = started.elapsed();
    assert!(!endless.passed);
    assert_eq!(endless.result, "timed out");
    assert!(took >= ex.timeout, "{took:?}");
    assert!(took < ex.timeout + Duration::from_secs(3), "{took:?}");
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let ex = executor();
    let p = tiny_problem();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("child-alive");
    // A child that would outlive its parent and touch a file after the timeout.
    let completion = format!(
        "    import subprocess, sys\n    subprocess.Popen([sys.executable, '-c', \
         'import time; time.sleep(4); open({marker:?}, \"w\").write(\"x\")'])\n    while True:\n        pass\n",
        marker = marker.display().to_string()
    );
    let r = ex.check(&p, &completion);
    assert_eq!(r.result, "timed out");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !marker.exists(),
        "a child of the timed-out program survived"
    );
}

#[test]
fn memory_limit_applies() {
    let ex = executor();
    let p = tiny_problem();
    let r = ex.check(&p, "    b = bytearray(8 << 30)\n    return 2 * x\n");
    assert!(!r.passed);
    assert!(r.result.contains("MemoryError"), "{r:?}");
}

#[test]
fn batch_runs_in_parallel_and_keeps_order() {
    let mut ex = executor();
    // Generous: the other tests run Python at the same time on a shared machine.
    ex.timeout = Duration::from_secs(20);
    ex.workers = 4;
    let p = tiny_problem();
    // Three programs that each wait (up to 15 s) until all three have started: they pass only
    // if the executor runs them at the same time. Concurrency is checked, not speed.
    let barrier = tempfile::tempdir().unwrap();
    let waiter = |i: usize| {
        format!(
            "    import os, time\n    d = {:?}\n    open(os.path.join(d, '{i}'), 'w').close()\n    \
             end = time.time() + 15\n    while len(os.listdir(d)) < 3 and time.time() < end:\n        \
             time.sleep(0.01)\n    assert len(os.listdir(d)) == 3\n    return 2 * x\n",
            barrier.path().display().to_string()
        )
    };
    let (a, b, c) = (waiter(0), waiter(1), waiter(2));
    let jobs: Vec<(&Problem, &str)> = vec![(&p, &a), (&p, "    return 0\n"), (&p, &b), (&p, &c)];
    let results = ex.check_all(&jobs);
    let passed: Vec<bool> = results.iter().map(|r| r.passed).collect();
    assert_eq!(passed, [true, false, true, true], "{results:#?}");
}

#[test]
fn no_network_inside_the_sandbox() {
    let ex = executor();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (received, stop) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).ok();
                        s.set_read_timeout(Some(Duration::from_secs(1))).ok();
                        let mut buf = Vec::new();
                        let _ = s.read_to_end(&mut buf);
                        received.lock().unwrap().extend(buf);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })
    };
    // The completion passes only if it reaches the listener.
    let p = Problem {
        task_id: "Net/0".into(),
        prompt: "def reach():\n".into(),
        canonical_solution: String::new(),
        test: "def check(candidate):\n    assert candidate() is True\n".into(),
        entry_point: "reach".into(),
    };
    let completion = format!(
        "    import socket\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    \
         s.sendall(b'escaped')\n    s.close()\n    return True\n"
    );
    let r = ex.check(&p, &completion);
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    match ex.sandbox() {
        Sandbox::UnshareNet => {
            assert!(!r.passed, "the program reached the network: {r:?}");
            assert!(received.lock().unwrap().is_empty());
            assert!(r.result.starts_with("failed: "), "{r:?}");
            assert_eq!(r.sandbox, Sandbox::UnshareNet);
        }
        Sandbox::None => {
            eprintln!(
                "SKIPPED network assertion: `unshare -rn` does not work on this machine, so \
                 programs run unsandboxed (result: {})",
                r.result
            );
            assert_eq!(r.sandbox, Sandbox::None);
        }
    }
}

#[test]
fn canonical_solutions_pass_and_empty_bodies_fail() {
    let path = match fetch_problems(false) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("SKIPPED: HumanEval could not be fetched ({e})");
            return;
        }
    };
    assert!(path.ends_with(humaneval_spec().file_name));
    let problems = load_problems(&path).unwrap();
    assert_eq!(problems.len(), 164);
    assert_eq!(problems[0].task_id, "HumanEval/0");
    assert_eq!(problems[163].task_id, "HumanEval/163");

    let ex = Executor::new().unwrap();
    let mut jobs: Vec<(&Problem, &str)> = Vec::new();
    for p in &problems[..10] {
        jobs.push((p, p.canonical_solution.as_str()));
        jobs.push((p, "    pass\n"));
    }
    let results = ex.check_all(&jobs);
    for (i, r) in results.iter().enumerate() {
        let task = &jobs[i].0.task_id;
        if i.is_multiple_of(2) {
            assert!(r.passed, "{task} canonical solution: {r:?}");
        } else {
            assert!(!r.passed, "{task} empty body passed");
        }
    }
}
