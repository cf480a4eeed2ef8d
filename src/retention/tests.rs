//! Golden cases for the retention plan.

use super::*;

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// One chain a day at 02:00 from `first`, each ending at the next one's start.
fn daily(first: &str, days: i64) -> Vec<ChainSpan> {
    let start = t(first);
    (0..days)
        .map(|i| {
            let s = start + Duration::days(i);
            ChainSpan {
                id: s.format("%Y%m%dT%H%M%SZ").to_string(),
                start: s,
                end: s + Duration::days(1),
            }
        })
        .collect()
}

fn policy() -> RetentionPolicy {
    RetentionPolicy {
        pitr: Duration::days(35),
        daily: None,
        weekly: None,
        monthly: Some(Duration::days(5 * 365 + 2)),
        yearly: None,
    }
}

fn kept(plan: &RetentionPlan) -> Vec<&str> {
    plan.keep.iter().map(|d| d.chain.as_str()).collect()
}

#[test]
fn pitr_window_keeps_every_chain_that_reaches_into_it() {
    let chains = daily("2026-01-01T02:00:00Z", 100);
    let now = t("2026-04-10T12:00:00Z");
    let p = plan(
        &chains,
        &RetentionPolicy {
            monthly: None,
            ..policy()
        },
        now,
    );
    // Window starts 2026-03-06T12:00; the chain of 03-06 02:00 ends 03-07 02:00 (reaches in),
    // the chain of 03-05 ends 03-06 02:00 (before the window).
    assert_eq!(kept(&p).first(), Some(&"20260306T020000Z"));
    assert!(p.remove.contains(&"20260305T020000Z".to_string()));
    assert!(p.keep.iter().all(|d| d.keep_segments));
    assert_eq!(p.keep.len() + p.remove.len(), 100);
}

#[test]
fn monthly_points_are_the_newest_snapshot_of_each_month_across_a_leap_year() {
    // 2027-12-01 .. 2028-03-31 daily; 2028 is a leap year.
    let chains = daily("2027-12-01T02:00:00Z", 122);
    let now = t("2028-04-01T00:00:00Z");
    let p = plan(
        &chains,
        &RetentionPolicy {
            pitr: Duration::days(1),
            ..policy()
        },
        now,
    );
    let monthly: Vec<(&str, Vec<Reason>)> = p
        .keep
        .iter()
        .filter(|d| !d.keep_segments)
        .map(|d| (d.chain.as_str(), d.reasons.clone()))
        .collect();
    assert_eq!(
        monthly,
        vec![
            ("20271231T020000Z", vec![Reason::Monthly("2027-12".into())]),
            ("20280131T020000Z", vec![Reason::Monthly("2028-01".into())]),
            ("20280229T020000Z", vec![Reason::Monthly("2028-02".into())]),
        ]
    );
    // March's newest is also the newest chain and inside the PITR window.
    let last = p.keep.last().unwrap();
    assert_eq!(last.chain, "20280331T020000Z");
    assert_eq!(
        last.reasons,
        vec![
            Reason::Newest,
            Reason::Pitr,
            Reason::Monthly("2028-03".into())
        ]
    );
}

#[test]
fn monthly_tier_stops_at_its_age() {
    let chains = daily("2020-01-15T02:00:00Z", 6 * 366);
    let now = t("2026-01-20T00:00:00Z");
    let p = plan(&chains, &policy(), now);
    let months: Vec<&Decision> = p.keep.iter().filter(|d| !d.keep_segments).collect();
    // 5 years of months back from now, minus the current month (it is in the PITR window).
    assert!(months.len() >= 59 && months.len() <= 61, "{}", months.len());
    assert!(
        months.iter().all(|d| d.chain.as_str() >= "20210118"),
        "nothing older than 5 years"
    );
}

#[test]
fn a_gap_does_not_break_the_window_and_the_newest_chain_is_always_kept() {
    let mut chains = daily("2026-03-01T02:00:00Z", 10);
    // Continuity lost: a chain started after a gap, still being written (no segments yet).
    let late = t("2026-05-01T09:00:00Z");
    chains.push(ChainSpan {
        id: "late".into(),
        start: late,
        end: late,
    });
    let now = t("2026-05-01T09:00:05Z");
    let p = plan(
        &chains,
        &RetentionPolicy {
            pitr: Duration::days(35),
            daily: None,
            weekly: None,
            monthly: None,
            yearly: None,
        },
        now,
    );
    assert_eq!(kept(&p), vec!["late"]);
    assert_eq!(p.keep[0].reasons, vec![Reason::Newest, Reason::Pitr]);
    assert_eq!(p.remove.len(), 10);
}

#[test]
fn weekly_and_yearly_periods_are_iso_weeks_and_calendar_years() {
    let chains = daily("2025-12-27T02:00:00Z", 10);
    let now = t("2026-01-06T00:00:00Z");
    let p = plan(
        &chains,
        &RetentionPolicy {
            pitr: Duration::hours(1),
            daily: None,
            weekly: Some(Duration::days(30)),
            monthly: None,
            yearly: Some(Duration::days(800)),
        },
        now,
    );
    let reasons: Vec<Reason> = p.keep.iter().flat_map(|d| d.reasons.clone()).collect();
    // 2025-12-28 is a Sunday (end of ISO week 52); 2026-01-04 ends ISO week 1 of 2026.
    assert!(reasons.contains(&Reason::Weekly("2025-W52".into())));
    assert!(reasons.contains(&Reason::Weekly("2026-W01".into())));
    assert!(reasons.contains(&Reason::Yearly("2025".into())));
    assert!(reasons.contains(&Reason::Yearly("2026".into())));
    let w52 = p
        .keep
        .iter()
        .find(|d| d.reasons.contains(&Reason::Weekly("2025-W52".into())))
        .unwrap();
    assert_eq!(w52.chain, "20251228T020000Z");
}

#[test]
fn order_of_input_does_not_matter() {
    let mut chains = daily("2026-01-01T02:00:00Z", 40);
    let now = t("2026-02-15T00:00:00Z");
    let a = plan(&chains, &policy(), now);
    chains.reverse();
    assert_eq!(plan(&chains, &policy(), now), a);
}

#[test]
fn month_boundaries_are_utc_and_the_last_snapshot_of_a_month_wins() {
    // 23:30Z on Jan 31 is already February in Berlin (+01:00); periods are UTC.
    let at = |s: &str| ChainSpan {
        id: s.into(),
        start: t(s),
        end: t(s),
    };
    let chains = vec![
        at("2026-01-31T22:00:00Z"),
        at("2026-01-31T23:30:00Z"),
        at("2026-02-01T00:30:00Z"),
        at("2026-02-28T23:59:59Z"),
        at("2026-03-01T00:00:00Z"),
    ];
    let p = plan(
        &chains,
        &RetentionPolicy {
            pitr: Duration::seconds(1),
            ..policy()
        },
        t("2026-03-01T00:00:00Z"),
    );
    let monthly: Vec<(&str, &Reason)> = p
        .keep
        .iter()
        .flat_map(|d| d.reasons.iter().map(move |r| (d.chain.as_str(), r)))
        .filter(|(_, r)| matches!(r, Reason::Monthly(_)))
        .collect();
    assert_eq!(
        monthly,
        vec![
            ("2026-01-31T23:30:00Z", &Reason::Monthly("2026-01".into())),
            ("2026-02-28T23:59:59Z", &Reason::Monthly("2026-02".into())),
            ("2026-03-01T00:00:00Z", &Reason::Monthly("2026-03".into())),
        ]
    );
    assert_eq!(
        p.remove,
        vec![
            "2026-01-31T22:00:00Z".to_string(),
            "2026-02-01T00:30:00Z".to_string()
        ]
    );
}
