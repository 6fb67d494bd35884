//! `stallmesh sim` as a developer runs it: the report, determinism check, seed sweep, and a broken
//! build caught with a replay line that reproduces the failure.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_stallmesh");

fn scenario(name: &str) -> String {
    format!("{}/../simulations/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn sim(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).arg("sim").args(args).arg("--quiet").output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn a_run_prints_the_report_and_writes_json_and_html() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("report");
    let (code, out) = sim(&[&scenario("partition-heal.toml"), "--seed", "3", "--out", out_dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    for field in
        ["sales acknowledged", "convergence p50 / p99 / max", "bytes per sale", "engine / protocol", "trace digest", "all invariants held"]
    {
        assert!(out.contains(field), "missing {field:?} in\n{out}");
    }
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["seed"], 3);
    assert!(json["sales"].as_u64().unwrap() > 0);
    assert_eq!(json["series"]["bucket_s"], 15, "two hours in 15 s buckets");
    let html = std::fs::read_to_string(out_dir.join("report.html")).unwrap();
    assert!(html.contains("Sales and refusals per 15 s") && html.contains("polyline") && html.contains("partition 0-5 | 6-9"));
}

#[test]
fn ci_checks_determinism_of_a_shipped_scenario() {
    let (code, out) = sim(&[&scenario("partition-heal.toml"), "--seed", "42", "--check-determinism"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("deterministic: two runs of seed 42 gave the same trace"), "{out}");
}

#[test]
fn ci_runs_a_small_seed_sweep() {
    let (code, out) = sim(&[&scenario("partition-heal.toml"), "--seeds", "1..5", "--jobs", "2"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("all 4 seeds passed"), "{out}");
}

#[test]
fn a_broken_build_is_caught_and_the_printed_replay_line_reproduces_it() {
    let (code, out) = sim(&[&scenario("partition-heal.toml"), "--seed", "9", "--broken-allow-overspend", "0"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("INVARIANT VIOLATED (seed 9)"), "{out}");
    assert!(out.contains("timeline of device 0"), "{out}");
    let replay = out.lines().find_map(|l| l.strip_prefix("replay: ")).expect("a replay line").to_string();
    assert!(replay.contains("--seed 9") && replay.contains("--broken-allow-overspend 0"), "{replay}");
    // Run exactly what was printed: the same violation, the same trace.
    let args: Vec<&str> = replay.split_whitespace().skip(2).collect();
    let (code2, out2) = sim(&args);
    assert_eq!(code2, 1, "{out2}");
    let digest = |o: &str| o.lines().find(|l| l.contains("trace digest")).map(str::to_string);
    assert_eq!(digest(&out), digest(&out2));
}

#[test]
fn shrink_writes_a_smaller_failing_scenario_and_its_replay_line_fails_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let (code, text) =
        sim(&[&scenario("crash-storm.toml"), "--seed", "5", "--broken-allow-overspend", "3", "--shrink", "--jobs", "2", "--out", out]);
    assert_eq!(code, 1, "{text}");
    let file = dir.path().join("crash-storm-seed5-shrunk.toml");
    assert!(text.contains(&format!("scenario: {}", file.display())), "{text}");
    let summary = text.lines().find(|l| l.starts_with("shrunk: ")).expect("a summary line");
    let invariant = summary.split_whitespace().nth(1).unwrap().to_string();
    let replay = text.lines().find_map(|l| l.strip_prefix("replay: ")).expect("a replay line");
    assert!(replay.starts_with(&format!("stallmesh sim {} --seed 5 --broken-allow-overspend ", file.display())), "{replay}");
    let args: Vec<&str> = replay.split_whitespace().skip(2).collect();
    let (code2, out2) = sim(&args);
    assert_eq!(code2, 1, "{out2}");
    assert!(out2.contains(&format!("  {invariant}: ")), "the replay fails {invariant}:\n{out2}");
}

#[test]
fn a_sweep_groups_failing_seeds_by_the_invariant_they_broke_with_a_replay_line_for_each_group() {
    let (code, out) = sim(&[&scenario("partition-heal.toml"), "--seeds", "1..3", "--jobs", "2", "--broken-allow-overspend", "0"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("2 of 2 seeds failed:"), "{out}");
    // "  <invariant>: <n> seeds [..]", then its replay line; the groups cover both seeds.
    let groups: Vec<(&str, usize)> = out
        .lines()
        .filter_map(|l| {
            let (invariant, rest) = l.strip_prefix("  ")?.split_once(": ")?;
            let n = rest.strip_suffix(']')?.split_once(" seeds [")?.0.parse().ok()?;
            Some((invariant, n))
        })
        .collect();
    assert_eq!(groups.iter().map(|(_, n)| n).sum::<usize>(), 2, "{out}");
    assert_eq!(out.matches("    replay the first: stallmesh sim ").count(), groups.len(), "{out}");
    assert!(out.contains("--seed 1 --broken-allow-overspend 0"), "{out}");
}
