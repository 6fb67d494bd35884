//! The simulator's own specification: determinism, every fault kind firing, and the checker
//! catching a broken build (a tablet overspending; a cloud losing a sale; an uplink uploading only
//! its own journal).

use stallmesh_sim::{check_determinism, run, sweep, BrokenCloud, Options, Scenario, CLOUD_INVARIANT};

fn shipped(name: &str) -> Scenario {
    Scenario::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../simulations").join(name)).unwrap()
}

/// A small market for quick runs: 3 stalls x 2 devices, 30 simulated minutes.
fn small(faults: &str) -> Scenario {
    Scenario::parse(
        &format!(
            r#"
name = "small"
duration_h = 0.5
liveness_bound_s = 30
[market]
stalls = 3
devices_per_stall = 2
products_per_stall = 4
initial_stock = 6
uplink_fraction = 0.5
[customers]
arrivals_per_stall_per_hour = 60
[network]
latency_ms = 2.0
loss = 0.002
duplicate = 0.01
reorder_ms = 10.0
{faults}
"#
        ),
        "small",
    )
    .unwrap()
}

#[test]
fn the_same_scenario_and_seed_give_the_same_trace_and_another_seed_does_not() {
    let sc = shipped("partition-heal.toml");
    let (digest, divergence) = check_determinism(&sc, 7);
    assert_eq!(divergence, None);
    let other = run(&sc, Options { seed: 8, ..Default::default() });
    assert_ne!(other.digest, digest, "the seed must matter");
}

#[test]
fn adding_a_device_does_not_change_the_other_devices_random_draws() {
    // Random streams are keyed by stall and device number: stall 0's customers arrive at the same
    // virtual times, at the same tablets, whether the market has 3 stalls or 4.
    let dir = tempfile::tempdir().unwrap();
    let attempts = |stalls: u32| -> Vec<String> {
        let mut sc = small("");
        sc.market.stalls = stalls;
        let path = dir.path().join(format!("trace-{stalls}"));
        let r = run(&sc, Options { seed: 3, trace_file: Some(path.clone()), ..Default::default() });
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter(|l| {
                let mut f = l.split(' ');
                let (_, dev, what) = (f.next(), f.next(), f.next());
                // Arrivals, not sales: a sale that waits for rights is acked when they arrive.
                matches!(dev, Some("0") | Some("1")) && what == Some("customer")
            })
            .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .collect()
    };
    let three = attempts(3);
    assert!(three.len() > 10);
    assert_eq!(three, attempts(4));
}

#[test]
fn every_fault_kind_fires_and_the_invariants_still_hold() {
    let faults = r#"
[[faults]]
kind = "partition"
at_s = 300
duration_s = 120
groups = [[0, 1, 2], [3, 4, 5]]
[[faults]]
kind = "asymmetric"
at_s = 500
duration_s = 60
from = [0]
to = [5]
[[faults]]
kind = "isolate"
at_s = 700
duration_s = 60
device = 2
[[faults]]
kind = "uplink_outage"
at_s = 800
duration_s = 300
[[faults]]
kind = "crash"
at_s = 900
down_s = 30
device = 1
lose_unsynced = true
[[faults]]
kind = "crash"
at_s = 1000
down_s = 30
device = 4
lose_unsynced = false
[[faults]]
kind = "clock_jump"
at_s = 1100
device = 3
jump_ms = -60000
[[faults]]
kind = "partition"
at_s = 1200
duration_s = 200
groups = [[0, 1, 2], [3, 4, 5]]
[[faults]]
kind = "move"
at_s = 1250
device = 0
side = 1
"#;
    let sc = small(faults);
    let r = run(&sc, Options { seed: 11, ..Default::default() });
    assert!(r.violations.is_empty(), "{:#?}", r.violations);
    for kind in ["partition", "asymmetric", "isolate", "uplink_outage", "crash", "clock_jump", "move"] {
        assert!(r.report.faults_fired.get(kind).is_some_and(|n| *n > 0), "{kind} did not fire: {:?}", r.report.faults_fired);
    }
    assert_eq!(r.report.faults_fired["crash"], 2);
    assert!(r.report.converged_after_faults_stopped_ms.is_some());
    assert!(r.report.sales > 10, "{}", r.report.table());
    // The outage made uplink requests fail (and back off); every sale still reached the cloud.
    assert!(r.report.cloud.uplink_failures > 0, "{}", r.report.table());
    assert_eq!(r.report.cloud.sales_not_in_cloud_by_end, 0, "{}", r.report.table());
}

#[test]
fn the_cloud_gets_every_sale_of_both_sides_through_the_one_walking_tablet() {
    let sc = shipped("walking-4g.toml");
    assert_eq!((sc.market.uplink_fraction * sc.devices() as f64).round(), 1.0, "one tablet has 4G");
    for (seed, report, violations) in sweep(&sc, 1..4, 2) {
        let table = report.table();
        assert!(violations.is_empty(), "seed {seed}: {violations:#?}\n{table}");
        assert_eq!(report.faults_fired.get("move"), Some(&6), "{table}");
        assert_eq!(report.cloud.sales_not_in_cloud_by_end, 0, "{table}");
        assert_eq!(report.cloud.rejected, Default::default(), "{table}");
        // The far side's sales waited minutes for the walker, never longer than it stays away
        // (10 minutes, plus its way back and the uplink's backoff): without the walks they would
        // wait for the split to heal, over an hour. The near side's went up at once.
        assert!(report.cloud.upload_lag_ms_max > 120_000.0, "{table}");
        assert!(report.cloud.upload_lag_ms_max < 700_000.0, "{table}");
        assert!(report.cloud.upload_lag_ms_p50 < 1_000.0, "{table}");
        // The cloud's watermarks came back down the uplink (and on through the mesh: replicas agree).
        assert!(report.cloud.watermarks > 0 && report.cloud.uplink_changes_downloaded > 0, "{table}");
        assert!(report.cloud.uplink_failures > 0, "the outage and the crash cut the uplink\n{table}");
    }
}

#[test]
fn the_cloud_invariant_catches_a_cloud_that_loses_an_accepted_sale() {
    let sc = small("");
    let fine = run(&sc, Options { seed: 2, ..Default::default() });
    assert!(fine.violations.is_empty(), "{:#?}", fine.violations);
    let r = run(&sc, Options { seed: 2, broken_cloud: Some(BrokenCloud::DropsOneSale), ..Default::default() });
    // The ingest core holds the sale and passes it on, so every replica agrees: only the cloud's
    // log lacks it, and only the cloud invariant can tell.
    let names: Vec<&str> = r.violations.iter().map(|v| v.invariant).collect();
    assert!(!names.is_empty() && names.iter().all(|n| *n == CLOUD_INVARIANT), "{:#?}", r.violations);
    let details: Vec<&str> = r.violations.iter().map(|v| v.detail.as_str()).collect();
    assert!(details.iter().any(|d| d.contains("jumps from offset")), "{details:#?}");
    assert!(details.iter().any(|d| d.contains("not in the cloud's log at the end")), "{details:#?}");
    assert_eq!(r.report.cloud.sales_not_in_cloud_by_end, 1, "{}", r.report.table());
}

#[test]
fn the_cloud_invariant_catches_an_uplink_that_uploads_only_its_own_journal() {
    // Half the tablets have 4G: the other half's sales reach the cloud only through them. (The
    // uplinks' own sales that spend others' transfers stay pending at the cloud and are uploaded
    // again after every reply: a short day keeps that cheap.)
    let mut sc = small("");
    sc.duration_h = 0.15;
    let r = run(&sc, Options { seed: 3, broken_cloud: Some(BrokenCloud::UploadsOwnJournalOnly), ..Default::default() });
    let v = r.violations.iter().find(|v| v.invariant == CLOUD_INVARIANT).unwrap_or_else(|| panic!("{:#?}", r.violations));
    // Caught during the day, a liveness bound after an uplink held the sale, not only at the end.
    assert!(v.detail.contains("after an uplink could carry it"), "{}", v.detail);
    assert!(!v.timeline.is_empty(), "the uplinked tablet's timeline is attached");
    assert!(r.report.cloud.sales_not_in_cloud_by_end > 0, "{}", r.report.table());
}

#[test]
fn a_partition_strands_stock_and_the_refusals_say_so() {
    let partitioned = small(
        r#"
[[faults]]
kind = "partition"
at_s = 60
duration_s = 1500
groups = [[0, 2, 4], [1, 3, 5]]
"#,
    );
    let r = run(&partitioned, Options { seed: 5, ..Default::default() });
    assert!(r.violations.is_empty(), "{:#?}", r.violations);
    let table = r.report.table();
    assert_eq!(r.report.faults_fired.get("partition"), Some(&1), "{table}");
    // Refused while the other side of the split held the units, and the report says so.
    assert!(r.report.refused_while_unreachable_held > 0, "{table}");
    assert!(r.report.converged_after_faults_stopped_ms.is_some(), "the split healed: {table}");
    // The same market and seed without the split strands (almost) nothing out of reach.
    let whole = run(&small(""), Options { seed: 5, ..Default::default() });
    assert!(whole.violations.is_empty(), "{:#?}", whole.violations);
    assert!(
        whole.report.refused_while_unreachable_held * 4 < r.report.refused_while_unreachable_held,
        "partitioned: {}, whole: {}",
        r.report.refused_while_unreachable_held,
        whole.report.refused_while_unreachable_held
    );
}

#[test]
fn a_tablet_running_low_asks_for_a_refill_before_a_customer_has_to_wait() {
    // The node's low-watermark refill, driven by the same `Rebalancer` in the simulator.
    let with_refills = shipped("stranded-units.toml");
    let r = run(&with_refills, Options { seed: 1, ..Default::default() });
    assert!(r.violations.is_empty(), "{:#?}", r.violations);
    let table = r.report.table();
    assert!(r.report.rights_asks_refill > 0, "sales that left a tablet low asked for a refill\n{table}");
    let mut no_refills = with_refills.clone();
    no_refills.rebalance.refill = 0;
    let without = run(&no_refills, Options { seed: 1, ..Default::default() });
    assert_eq!(without.report.rights_asks_refill, 0);
    eprintln!("waited with refills {}, without {}", r.report.sales_after_waiting_for_rights, without.report.sales_after_waiting_for_rights);
    assert!(
        r.report.sales_after_waiting_for_rights < without.report.sales_after_waiting_for_rights,
        "refills mean fewer customers wait: {} with, {} without",
        r.report.sales_after_waiting_for_rights,
        without.report.sales_after_waiting_for_rights
    );
}

#[test]
fn the_scenario_sets_the_rebalancing_numbers() {
    let sc = Scenario::parse(
        &std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../simulations/stranded-units.toml"))
            .unwrap()
            .replace("[customers]", "[rebalance]\nmin_keep = 2\nrefill = 3\n\n[customers]"),
        "stranded-units+rebalance",
    )
    .unwrap();
    assert_eq!(sc.rebalance, stallmesh_sync::rebalance::RebalancePolicy { min_keep: 2, low_watermark: 1, refill: 3 });
    assert_eq!(shipped("market-day.toml").rebalance, Default::default());
}

#[test]
fn no_sale_is_refused_while_a_reachable_idle_tablet_holds_the_units() {
    let sc = shipped("stranded-units.toml");
    let r = run(&sc, Options { seed: 1, ..Default::default() });
    assert!(r.violations.is_empty(), "{:#?}", r.violations);
    let table = r.report.table();
    eprintln!("{table}");
    // A selling tablet, too, gives a waiting sale what it lacks.
    assert_eq!(r.report.refused_while_reachable_idle_held, 0, "{table}");
    assert_eq!(r.report.refused_while_reachable_held, 0, "{table}");
    assert_eq!(r.report.units_unsold, 0, "every unit is sold by the end of the day\n{table}");
    assert!(r.report.sales_after_waiting_for_rights > 0, "no sale waited: the scenario does not strand units\n{table}");
    assert!(r.report.refused.get("insufficient_stock_rights").is_some_and(|n| *n > 0), "stock must run out\n{table}");
}

#[test]
fn random_faults_are_drawn_from_the_seed() {
    let sc = shipped("crash-storm.toml");
    let a = run(&sc, Options { seed: 2, ..Default::default() });
    assert!(a.violations.is_empty(), "{:#?}", a.violations);
    assert!(a.report.faults_fired["crash"] > 5, "{:?}", a.report.faults_fired);
    assert!(a.report.faults_fired.contains_key("clock_jump"));
}

#[test]
fn the_checker_catches_a_device_that_spends_rights_it_does_not_hold() {
    let sc = small("");
    let r = run(&sc, Options { seed: 1, broken_device: Some(0), ..Default::default() });
    let names: Vec<&str> = r.violations.iter().map(|v| v.invariant).collect();
    assert!(names.contains(&"no_acknowledged_sale_lost") || names.contains(&"no_negative_stock"), "{names:?}");
    let v = r.violations.iter().find(|v| v.device == Some(0)).expect("the broken device is named");
    assert!(!v.timeline.is_empty(), "the device's timeline is attached");
}

#[test]
fn a_seed_sweep_runs_on_all_jobs_and_reports_every_seed() {
    let sc = small("");
    let results = sweep(&sc, 1..5, 2);
    assert_eq!(results.iter().map(|(s, _, _)| *s).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    for (seed, report, violations) in &results {
        assert!(violations.is_empty(), "seed {seed}: {violations:#?}");
        assert_eq!(report.seed, *seed);
    }
}

#[test]
fn every_shipped_scenario_parses() {
    for entry in std::fs::read_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../simulations")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let err = Scenario::parse("name = 1", "bad.toml").unwrap_err().to_string();
    assert!(err.contains("bad.toml"), "{err}");
}

#[test]
fn loyalty_spent_on_both_sides_of_a_split_stays_within_budget_and_every_replica_reports_it_alike() {
    let sc = shipped("loyalty-partition.toml");
    let r = run(&sc, Options { seed: 3, ..Default::default() });
    let table = r.report.table();
    // The checker compares what tablets acknowledged with every replica's exposures: a replica
    // that missed a double spend (or invented one) is a violation.
    assert!(r.violations.is_empty(), "{:#?}\n{table}", r.violations);
    let l = r.report.loyalty.expect("a loyalty scenario reports loyalty");
    assert!(l.gives > 0, "reachable holders handed points and vouchers over\n{table}");
    assert!(l.points_redeemed_unproven > 0 && l.vouchers_redeemed_unproven > 0, "the far side used its budget\n{table}");
    assert!(l.points_exposed > 0 && l.vouchers_exposed > 0, "customers spent twice across the split\n{table}");
    let spec = sc.loyalty.as_ref().unwrap();
    let tablets = u64::from(sc.devices());
    assert!(l.points_exposed <= tablets * spec.offline_points_per_device, "{table}");
    assert!(l.vouchers_exposed <= tablets * spec.offline_vouchers_per_device, "{table}");
}

#[test]
fn the_series_counts_every_sale_and_refusal_in_buckets_that_fit_the_run_and_draws_each_fault_as_it_happened() {
    let sc = small(
        r#"
[[faults]]
kind = "partition"
at_s = 300
duration_s = 240
groups = [[0, 1, 2], [3, 4, 5]]
[[faults]]
kind = "crash"
at_s = 900
down_s = 60
device = 4
"#,
    );
    let r = run(&sc, Options { seed: 3, ..Default::default() });
    assert!(r.violations.is_empty(), "{:#?}", r.violations);
    let s = &r.report.series;
    // Half an hour and its liveness phase: 5 s buckets (at most 600 points).
    assert_eq!(s.bucket_s, 5);
    assert_eq!(s.sales.iter().sum::<u64>(), r.report.sales);
    assert_eq!(s.refused.iter().sum::<u64>(), r.report.refused.values().sum::<u64>());
    assert_eq!(s.bytes.iter().sum::<u64>() + s.uplink_bytes.iter().sum::<u64>(), r.report.bytes);
    let n = s.sales.len();
    assert!([&s.refused, &s.bytes, &s.uplink_bytes, &s.sessions, &s.devices_up, &s.sales_not_in_cloud].iter().all(|v| v.len() == n));
    let kinds: Vec<(&str, f64, f64)> = s.faults.iter().map(|f| (f.kind, f.start_s, f.end_s)).collect();
    assert_eq!(kinds, vec![("partition", 300.0, 540.0), ("crash", 900.0, 960.0)]);
    assert_eq!(s.faults[1].label, "tablet 4 crashes");
    // The crashed tablet is counted down during its crash, and up before and after.
    let at = |t_s: u64| (t_s / s.bucket_s) as usize;
    assert_eq!(s.devices_up[at(920)], 5);
    assert_eq!(s.devices_up[at(1000)], 6);
    // Stock is followed per side of the split: each scarce SKU has one line per side.
    assert_eq!(s.scarce_stock.len(), 3 * 2, "{:?}", s.scarce_stock.iter().map(|l| (&l.sku, &l.side)).collect::<Vec<_>>());
    assert!(s.scarce_stock[0].side.starts_with("side 0 (tablets 0-2)"), "{}", s.scarce_stock[0].side);
}

#[test]
fn the_html_report_is_one_file_with_a_plot_per_series_and_the_faults_labelled_on_them() {
    let sc = shipped("partition-heal.toml");
    let r = run(&sc, Options { seed: 3, ..Default::default() });
    let html = stallmesh_sim::html::render(&r.report, &r.violations).unwrap();
    assert!(html.starts_with("<!doctype html>"));
    // (The SVG namespace is a name, not an address anything is fetched from.)
    assert!(!html.contains("<script") && !html.contains("src=") && !html.contains("href=") && !html.contains("url("), "nothing fetched");
    assert_eq!(html.matches("<svg").count(), 5 + 3, "five series and three scarce SKUs");
    // Each plot carries the partition's and the isolation's bands and labels.
    assert_eq!(html.matches("partition 0-5 | 6-9").count(), 8 + 1, "on every plot and in the fault table");
    assert_eq!(html.matches("tablet 3 off the Wi-Fi").count(), 8 + 1);
    assert!(html.contains("All invariants held"));
}

#[test]
fn a_broken_builds_failure_shrinks_to_at_most_ten_fault_events_that_still_fail_the_same_way() {
    // A crash storm: some forty crashes drawn from the seed, two fixed faults, and a tablet that
    // spends rights it does not hold.
    let sc = shipped("crash-storm.toml");
    let opts = Options { seed: 5, broken_device: Some(3), ..Default::default() };
    let shrunk = stallmesh_sim::shrink(&sc, &opts, 2, &mut |step| eprintln!("kept failing with {step}")).unwrap();
    let invariant = shrunk.invariant; // the one the original run failed first
    assert!(shrunk.faults_before >= 20, "{}", shrunk.faults_before);
    assert!(shrunk.faults_after <= 10, "{} faults left: {:?}", shrunk.faults_after, shrunk.scenario.faults);
    assert!(shrunk.scenario.devices() < sc.devices() && shrunk.scenario.duration_h < sc.duration_h, "{:?}", shrunk.steps);
    // The file it writes parses, and replaying it fails the same invariant.
    let again = Scenario::parse(&shrunk.toml(), "shrunk").unwrap();
    assert_eq!(again.faults.len(), shrunk.faults_after);
    let replay = run(&again, Options { seed: 5, broken_device: shrunk.broken_device, ..Default::default() });
    assert!(replay.violations.iter().any(|v| v.invariant == invariant), "{:#?}", replay.violations);
}

#[test]
fn a_passing_run_has_nothing_to_shrink() {
    let sc = small("");
    assert_eq!(stallmesh_sim::shrink(&sc, &Options { seed: 1, ..Default::default() }, 2, &mut |_| {}).unwrap_err(), stallmesh_sim::ShrinkError::Passes(1));
}

#[test]
fn a_drop_sold_at_the_stalls_and_online_through_a_flapping_uplink_is_never_oversold_and_every_expired_hold_comes_back() {
    let sc = shipped("drop-live.toml");
    let r = run(&sc, Options { seed: 7, ..Default::default() });
    let table = r.report.table();
    // Always on during the run: units over all channels never above the drop's, holds never above
    // what the online channel holds, a held hold always payable, an expired one reserving nothing.
    assert!(r.violations.is_empty(), "{:#?}\n{table}", r.violations);
    let d = r.report.drop.clone().expect("a drop scenario reports the drop");
    let sold = d.sold_online + d.sold_per_stall.iter().sum::<u64>();
    let left = d.left_online + d.left_per_stall.iter().sum::<u64>();
    assert_eq!(sold + left, d.units, "every unit is sold or held somewhere\n{table}");
    assert_eq!(d.sold_out_after_s.is_some(), left == 0, "{table}");
    assert!(d.sold_online > 0 && d.sold_per_stall.iter().all(|n| *n > 0), "both channels sold\n{table}");
    assert!(d.holds_abandoned > 0 && d.units_returned_by_expiry > 0, "abandoned holds expired and gave their units back\n{table}");
    assert!(d.buyers_who_held > 0 && d.buyers_left_empty > 0, "a crowd larger than the drop: some buyers held, some left\n{table}");
    assert!(d.units_given_to_online + d.units_given_by_online > 0, "rights moved between the channels\n{table}");
    let buyers = d.online_buyers;
    assert!(d.hold_requests >= buyers && d.sold_out_replies > 0, "{table}");
}

#[test]
fn the_drop_checker_catches_holds_that_ignore_each_other() {
    let sc = shipped("drop-live.toml");
    let r = run(&sc, Options { seed: 7, broken_cloud: Some(BrokenCloud::HoldsReadAsNone), ..Default::default() });
    let names: Vec<&str> = r.violations.iter().map(|v| v.invariant).collect();
    assert!(names.contains(&"holds_within_online_rights"), "{names:?}");
    assert!(names.contains(&"a_hold_is_a_promise"), "a buyer holding units could not pay for them: {names:?}");
}
