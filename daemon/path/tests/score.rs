//! Tier 1: the score and the switch comparator as tables (STYLE §4), hysteresis included.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use mistnet_path::{Config, PathMetrics, better, score, should_switch};

fn m(rtt_ms: u64, loss_pct: f64, cost: u32) -> PathMetrics {
    PathMetrics {
        srtt: Some(Duration::from_millis(rtt_ms)),
        jitter: Duration::ZERO,
        loss: loss_pct / 100.0,
        samples: 64,
        cost,
        relay: false,
    }
}

fn relay(mut p: PathMetrics) -> PathMetrics {
    p.relay = true;
    p
}

#[test]
fn score_table() {
    let cfg = Config::default();
    // (metrics, expected score in ms-equivalent)
    let rows = [
        (m(10, 0.0, 0), 35.0),
        (m(75, 0.0, 0), 100.0),
        (m(25, 50.0, 0), 200.0),
        (m(10, 0.0, 40), 75.0),
        (
            PathMetrics {
                jitter: Duration::from_millis(5),
                ..m(10, 0.0, 0)
            },
            45.0,
        ),
    ];
    for (i, (metrics, want)) in rows.iter().enumerate() {
        let got = score(metrics, &cfg);
        assert!((got - want).abs() < 1e-6, "row {i}: {got} != {want}");
    }
}

#[test]
fn comparator_table() {
    let cfg = Config::default();
    let hold = cfg.switch_hold;
    let few = PathMetrics {
        samples: cfg.min_samples - 1,
        ..m(5, 0.0, 0)
    };
    // (name, candidate, current, better for, expected switch)
    let rows: Vec<(&str, PathMetrics, PathMetrics, Duration, bool)> = vec![
        (
            "1 ms advantage never switches",
            m(20, 0.0, 0),
            m(21, 0.0, 0),
            hold * 10,
            false,
        ),
        (
            "4 ms advantage is below the absolute margin",
            m(10, 0.0, 0),
            m(14, 0.0, 0),
            hold,
            false,
        ),
        (
            "10% better is below the relative margin",
            m(90, 0.0, 0),
            m(100, 0.0, 0),
            hold,
            false,
        ),
        (
            "clearly better but not long enough",
            m(20, 0.0, 0),
            m(80, 0.0, 0),
            hold - Duration::from_millis(1),
            false,
        ),
        (
            "clearly better for the hold time",
            m(20, 0.0, 0),
            m(80, 0.0, 0),
            hold,
            true,
        ),
        (
            "lower loss beats lower rtt",
            m(30, 0.0, 0),
            m(20, 10.0, 0),
            hold,
            false,
        ),
        (
            "much lower loss beats lower rtt",
            m(30, 0.0, 0),
            m(20, 25.0, 0),
            hold,
            true,
        ),
        (
            "5% vs 15% loss alternation stays below margin",
            m(20, 5.0, 0),
            m(20, 10.0, 0),
            hold,
            false,
        ),
        (
            "cost keeps a metered link out",
            m(20, 0.0, 100),
            m(40, 0.0, 0),
            hold,
            false,
        ),
        (
            "cheap beats costly of equal rtt",
            m(20, 0.0, 0),
            m(20, 0.0, 100),
            hold,
            true,
        ),
        ("too few samples", few, m(80, 0.0, 0), hold, false),
        (
            "direct beats relay regardless of score",
            m(200, 20.0, 0),
            relay(m(20, 0.0, 0)),
            hold,
            true,
        ),
        (
            "direct beats relay only after the hold",
            m(200, 0.0, 0),
            relay(m(20, 0.0, 0)),
            Duration::ZERO,
            false,
        ),
        (
            "relay never beats direct",
            relay(m(5, 0.0, 0)),
            m(300, 40.0, 0),
            hold,
            false,
        ),
        (
            "relay vs relay by score",
            relay(m(20, 0.0, 0)),
            relay(m(80, 0.0, 0)),
            hold,
            true,
        ),
        (
            "unknown rtt loses to measured",
            m(20, 0.0, 0),
            PathMetrics {
                srtt: None,
                ..m(0, 0.0, 0)
            },
            hold,
            true,
        ),
    ];
    for (name, cand, cur, held, want) in rows {
        assert_eq!(should_switch(&cand, &cur, held, &cfg), want, "{name}");
        if want {
            assert!(better(&cand, &cur, &cfg), "{name}");
        }
    }
}

#[test]
fn better_is_asymmetric() {
    let cfg = Config::default();
    for (a, b) in [(10, 40), (40, 10), (25, 25), (100, 300)] {
        let (x, y) = (m(a, 0.0, 0), m(b, 0.0, 0));
        assert!(
            !(better(&x, &y, &cfg) && better(&y, &x, &cfg)),
            "{a} vs {b}"
        );
    }
}
