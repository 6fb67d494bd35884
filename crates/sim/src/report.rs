//! The run's report: a summary table, a JSON file and an SVG with plots.

use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Default, Serialize)]
pub struct HourStats {
    pub sales: u64,
    pub bytes: u64,
    pub lag_ms_sum: f64,
    pub lag_count: u64,
    pub lag_ms_max: f64,
}

/// The cloud's side of the run: its ingest core's counters, the tablets' uplink cores' counters
/// (those discarded by crashes included), and how long sales took to reach the cloud's log.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CloudReport {
    /// Entries in the cloud's log at the end (offsets 1..=log_entries), the day's opening
    /// entries included.
    pub log_entries: u64,
    /// Changes the ingest core logged during the run (its own watermarks included), duplicates it
    /// was sent again, changes it refused by reason, watermarks it recorded.
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: BTreeMap<String, u64>,
    pub watermarks: u64,
    /// Requests the uplinks sent (heads and uploads), those that failed (lost, timed out, cut by
    /// an outage), changes and bytes they uploaded, changes they brought back to the mesh.
    pub uplink_requests: u64,
    pub uplink_failures: u64,
    pub uplink_changes_uploaded: u64,
    pub uplink_bytes_uploaded: u64,
    pub uplink_changes_downloaded: u64,
    /// Per sale, from its acknowledgement until the cloud logged it.
    pub upload_lag_ms_p50: f64,
    pub upload_lag_ms_p99: f64,
    pub upload_lag_ms_max: f64,
    pub sales_not_in_cloud_by_end: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub devices: u32,
    pub simulated_hours: f64,
    pub events: u64,
    pub sales: u64,
    pub refused: BTreeMap<String, u64>,
    /// Refused sales where a peer with a live session, up and not cut off, held rights for the SKU.
    pub refused_while_reachable_held: u64,
    /// ... of which an idle one (no sales in the rebalancing window) held some: stranded units.
    /// The rest were held by selling tablets, which keep `min_keep` for their own customers.
    pub refused_while_reachable_idle_held: u64,
    /// Refused sales where no reachable tablet held rights for the SKU but another one did (a
    /// partition, a crash, a lost connection: stock stranded out of reach).
    pub refused_while_unreachable_held: u64,
    /// Units restocked and not sold by the end of the day (as device 0 sees it).
    pub units_unsold: u64,
    /// Sales acknowledged after waiting for rights a peer gave.
    pub sales_after_waiting_for_rights: u64,
    /// Asks for stock rights sent by every device (for a waiting sale, refills below the low
    /// watermark) and those the rate limit held back (`Rebalancer::ask`).
    pub rights_asks_for_sale: u64,
    pub rights_asks_refill: u64,
    pub rights_asks_rate_limited: u64,
    pub customers_lost: u64,
    /// Time from a sale's acknowledgement until every device holds it.
    pub convergence_ms_p50: f64,
    pub convergence_ms_p99: f64,
    pub convergence_ms_max: f64,
    pub sales_not_converged_by_end: u64,
    pub converged_after_faults_stopped_ms: Option<f64>,
    pub messages: u64,
    pub bytes: u64,
    pub messages_per_sale: f64,
    pub bytes_per_sale: f64,
    pub storage_bytes_per_device_mean: f64,
    pub storage_bytes_per_device_max: u64,
    pub faults_fired: BTreeMap<String, u64>,
    pub wall_ms: f64,
    pub protocol_ms: f64,
    pub engine_ms: f64,
    pub per_hour: Vec<HourStats>,
    pub cloud: CloudReport,
    /// With loyalty customers in the scenario.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loyalty: Option<LoyaltyReport>,
    /// With a drop sold at the stalls and online in the scenario.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop: Option<DropReport>,
    /// Bucket by bucket, at a resolution that fits the run, with the faults as they happened.
    pub series: crate::series::Series,
    pub digest: String,
}

/// Loyalty over the day: what customers' cards earned and redeemed, vouchers, and what was spent
/// twice across partitions (the exposures every replica reports).
/// A drop sold at the stalls and online at once: where its units went, how long online buyers
/// waited, what the holds did, and how rights moved between the channels.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DropReport {
    pub units: u64,
    /// Planned to the online channel; the rest to the stalls' selling tablets.
    pub planned_online: u64,
    pub sold_online: u64,
    pub sold_per_stall: Vec<u64>,
    /// From the opening until the last unit was sold; `None`: units were left.
    pub sold_out_after_s: Option<f64>,
    /// Units still held at the end (unsold), by the online channel and per stall.
    pub left_online: u64,
    pub left_per_stall: Vec<u64>,
    pub online_buyers: u64,
    /// Hold requests (first tries and retries), holds placed, paid, abandoned, expired (abandoned
    /// or paid too late), payments after expiry, units freed by expiry.
    pub hold_requests: u64,
    pub holds_placed: u64,
    pub holds_paid: u64,
    pub holds_abandoned: u64,
    pub holds_expired: u64,
    pub paid_too_late: u64,
    pub units_returned_by_expiry: u64,
    /// 409 sold out answers, and buyers who left without units (sold out for good, out of
    /// patience, over the per-buyer limit).
    pub sold_out_replies: u64,
    pub buyer_limit_replies: u64,
    pub buyers_left_empty: u64,
    /// Buyers who got a hold, and how long from arriving until they did (retries included).
    pub buyers_who_held: u64,
    pub hold_wait_ms_p50: f64,
    pub hold_wait_ms_p99: f64,
    pub hold_wait_ms_max: f64,
    /// The online channel's asks to the tablets, and units the tablets gave it.
    pub online_asks: u64,
    pub units_given_to_online: u64,
    /// Tills short of the drop asking the online channel through their uplink, and units it gave.
    pub tablet_asks_online: u64,
    pub units_given_by_online: u64,
    /// Walk-in buyers of the drop at the stalls (one unit each).
    pub walk_ins: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LoyaltyReport {
    pub card_sales: u64,
    pub points_earned: u64,
    pub points_redeemed_proven: u64,
    /// Redeemed from offline budgets.
    pub points_redeemed_unproven: u64,
    /// Redemptions refused (short of points): the customer paid without.
    pub redemptions_refused: u64,
    /// Asks to reachable holders, and the transfers they made.
    pub asks: u64,
    pub gives: u64,
    pub vouchers_minted: u64,
    pub vouchers_redeemed_proven: u64,
    pub vouchers_redeemed_unproven: u64,
    pub vouchers_refused: u64,
    /// Cards and vouchers spent twice, and by how much.
    pub exposures: u64,
    pub points_exposed: u64,
    pub vouchers_exposed: u64,
}

impl Report {
    /// The summary table for a terminal.
    pub fn table(&self) -> String {
        self.rows().iter().map(|(k, v)| format!("  {k:<34} {v}\n")).collect()
    }

    /// The summary, row by row: (what, figure). The terminal table and the HTML report show these.
    pub fn rows(&self) -> Vec<(&'static str, String)> {
        let refused: u64 = self.refused.values().sum();
        let mut t = Vec::new();
        let mut row = |k: &'static str, v: String| t.push((k, v));
        row("scenario / seed", format!("{} / {}", self.scenario, self.seed));
        row("devices, simulated hours", format!("{}, {}", self.devices, self.simulated_hours));
        row("events", self.events.to_string());
        row("sales acknowledged", self.sales.to_string());
        row("sales refused", format!("{refused} {:?}", self.refused));
        row(
            "refused, a reachable tablet held",
            format!("{} (an idle tablet: {})", self.refused_while_reachable_held, self.refused_while_reachable_idle_held),
        );
        row("sales after waiting for rights", self.sales_after_waiting_for_rights.to_string());
        row(
            "rights asks sale/refill/limited",
            format!("{}/{}/{}", self.rights_asks_for_sale, self.rights_asks_refill, self.rights_asks_rate_limited),
        );
        row("units unsold at the end", self.units_unsold.to_string());
        row("customers lost (stall down)", self.customers_lost.to_string());
        row(
            "convergence p50 / p99 / max",
            format!("{:.1} / {:.1} / {:.1} ms", self.convergence_ms_p50, self.convergence_ms_p99, self.convergence_ms_max),
        );
        row(
            "converged after faults stopped",
            self.converged_after_faults_stopped_ms.map_or("NOT within the bound".into(), |ms| format!("{ms:.0} ms")),
        );
        row("messages / bytes per sale", format!("{:.1} / {:.0} B", self.messages_per_sale, self.bytes_per_sale));
        row(
            "storage per device mean / max",
            format!("{:.1} / {:.1} KB", self.storage_bytes_per_device_mean / 1e3, self.storage_bytes_per_device_max as f64 / 1e3),
        );
        let c = &self.cloud;
        row("cloud log / accepted / dup / watermarks", format!("{} / {} / {} / {}", c.log_entries, c.accepted, c.duplicates, c.watermarks));
        row("cloud refused", format!("{} {:?}", c.rejected.values().sum::<u64>(), c.rejected));
        row(
            "uplink requests / failures / bytes",
            format!(
                "{} / {} / {:.1} KB ({} changes up, {} down)",
                c.uplink_requests,
                c.uplink_failures,
                c.uplink_bytes_uploaded as f64 / 1e3,
                c.uplink_changes_uploaded,
                c.uplink_changes_downloaded
            ),
        );
        row(
            "upload lag p50 / p99 / max",
            format!(
                "{:.1} / {:.1} / {:.1} ms ({} sales not in the cloud)",
                c.upload_lag_ms_p50, c.upload_lag_ms_p99, c.upload_lag_ms_max, c.sales_not_in_cloud_by_end
            ),
        );
        if let Some(l) = &self.loyalty {
            row("card sales / points earned", format!("{} / {}", l.card_sales, l.points_earned));
            row(
                "points redeemed proven / budget",
                format!("{} / {} ({} refused; {} asks, {} gives)", l.points_redeemed_proven, l.points_redeemed_unproven, l.redemptions_refused, l.asks, l.gives),
            );
            row(
                "vouchers minted / proven / budget",
                format!("{} / {} / {} ({} refused)", l.vouchers_minted, l.vouchers_redeemed_proven, l.vouchers_redeemed_unproven, l.vouchers_refused),
            );
            row("spent twice (exposures)", format!("{}: {} points, {} vouchers", l.exposures, l.points_exposed, l.vouchers_exposed));
        }
        if let Some(d) = &self.drop {
            let stalls: u64 = d.sold_per_stall.iter().sum();
            row(
                "drop sold online / at stalls / of",
                format!("{} / {} {:?} / {} (planned online {})", d.sold_online, stalls, d.sold_per_stall, d.units, d.planned_online),
            );
            row("drop sold out after", d.sold_out_after_s.map_or("NOT sold out".into(), |s| format!("{s:.1} s")));
            row("drop left online / at stalls", format!("{} / {:?}", d.left_online, d.left_per_stall));
            row(
                "online buyers held / left empty / of",
                format!("{} / {} / {} ({} requests, {} sold out answers)", d.buyers_who_held, d.buyers_left_empty, d.online_buyers, d.hold_requests, d.sold_out_replies),
            );
            row("wait for a hold p50 / p99 / max", format!("{:.0} / {:.0} / {:.0} ms", d.hold_wait_ms_p50, d.hold_wait_ms_p99, d.hold_wait_ms_max));
            row(
                "holds placed / paid / abandoned / expired",
                format!("{} / {} / {} / {} ({} paid too late, {} units back)", d.holds_placed, d.holds_paid, d.holds_abandoned, d.holds_expired, d.paid_too_late, d.units_returned_by_expiry),
            );
            row(
                "rights to online / from online",
                format!("{} units ({} asks) / {} units ({} asks)", d.units_given_to_online, d.online_asks, d.units_given_by_online, d.tablet_asks_online),
            );
        }
        row("faults fired", format!("{:?}", self.faults_fired));
        row("wall time (engine / protocol)", format!("{:.0} ms ({:.0} / {:.0} ms)", self.wall_ms, self.engine_ms, self.protocol_ms));
        row("trace digest", self.digest.clone());
        t
    }

    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self).expect("report serializes"))
    }

    /// The HTML report: the summary, the plots with the faults drawn on them, and the timeline
    /// of any violation. One file, nothing fetched from elsewhere.
    pub fn write_html(&self, violations: &[crate::Violation], path: &Path) -> Result<(), String> {
        let html = crate::html::render(self, violations)?;
        std::fs::write(path, html).map_err(|e| format!("{}: {e}", path.display()))
    }
}
