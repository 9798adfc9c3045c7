//! What a simulation shows: a table per policy, the results as JSON, and an SVG plot of
//! reward per round and cumulative regret over time.

use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use serde::Serialize;

use crate::SimError;
use crate::encoder::EncoderReport;
use crate::run::{PolicyRun, QParams, Simulation, Summary, VISIT_BUCKETS};
use crate::spec::PolicyParams;
use crate::world::{LogitTerms, Rewards, WorldConfig};

/// Most points of one line in the plot; longer series are thinned evenly.
const PLOT_POINTS: usize = 1000;
/// Points of each curve in the JSON report.
const JSON_POINTS: usize = 200;

/// The moving-average window of a run of `rounds` rounds: 2% of it, at least 1.
pub fn window(rounds: usize) -> usize {
    (rounds / 50).max(1)
}

/// The trailing moving average of `values` over `window` values (fewer at the start).
pub fn moving_average(values: &[f64], window: usize) -> Vec<f64> {
    let window = window.max(1);
    let mut sum = 0.0;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            sum += v;
            if i >= window {
                sum -= values[i - window];
            }
            sum / (i + 1).min(window) as f64
        })
        .collect()
}

/// Indices of at most `points` evenly spread values of a series of `len`, always with
/// the last one.
fn thin(len: usize, points: usize) -> impl Iterator<Item = usize> {
    let step = len.div_ceil(points.max(1)).max(1);
    (0..len)
        .filter(move |i| i % step == 0 || *i + 1 == len)
        .take(points + 1)
}

/// The width of a first column holding `names` and `title`.
fn name_width<'a>(names: impl IntoIterator<Item = &'a str>, title: &str) -> usize {
    names
        .into_iter()
        .map(str::len)
        .max()
        .unwrap_or(0)
        .max(title.len())
}

/// The table of results, one row per policy.
pub fn table(summaries: &[Summary]) -> String {
    let width = name_width(summaries.iter().map(|s| s.policy.as_str()), "policy");
    let mut out = format!(
        "{:<width$}  {:>8}  {:>11}  {:>8}  {:>7}  {:>8}  {:>10}  {:>9}  {:>12}  {:>13}  {:>7}\n",
        "policy",
        "rounds",
        "impressions",
        "clicks",
        "CTR",
        "pref-cat",
        "reward/imp",
        "reward/rd",
        "cum. regret",
        "regret/rd@end",
        "wall s",
    );
    for s in summaries {
        out.push_str(&format!(
            "{:<width$}  {:>8}  {:>11}  {:>8}  {:>6.2}%  {:>7.1}%  {:>10.4}  {:>9.4}  {:>12.1}  {:>13.4}  {:>7.1}\n",
            s.policy,
            s.rounds,
            s.impressions,
            s.clicks,
            100.0 * s.ctr,
            100.0 * s.preferred_share,
            s.reward_per_impression,
            s.reward_per_round,
            s.cumulative_regret,
            s.final_regret_per_round,
            s.wall_seconds,
        ));
    }
    out
}

/// A table of shares by column: a header row (`title`, then `columns`), the rows
/// `above` gives (a name and its values), then one row per policy of `values`.
fn share_table(
    title: &str,
    columns: &[String],
    above: &[(&str, Vec<f64>)],
    summaries: &[Summary],
    values: fn(&Summary) -> &[f64],
) -> String {
    let width = name_width(
        summaries
            .iter()
            .map(|s| s.policy.as_str())
            .chain(above.iter().map(|(name, _)| *name)),
        title,
    );
    let mut out = format!("{title:<width$}");
    for column in columns {
        out.push_str(&format!("  {column:>6}"));
    }
    out.push('\n');
    let rows = above
        .iter()
        .map(|(name, v)| (*name, v.as_slice()))
        .chain(summaries.iter().map(|s| (s.policy.as_str(), values(s))));
    for (name, shares) in rows {
        out.push_str(&format!("{name:<width$}"));
        for share in shares {
            out.push_str(&format!("  {:>5.2}%", 100.0 * share));
        }
        out.push('\n');
    }
    out
}

/// CTR by tenth of the run, one row per policy.
pub fn tenths(summaries: &[Summary]) -> String {
    let columns: Vec<String> = (1..=10).map(|k| format!("{k}0%")).collect();
    share_table("CTR by tenth", &columns, &[], summaries, |s| {
        &s.ctr_by_tenth
    })
}

/// CTR by the user's visit (see [`VISIT_BUCKETS`]), one row per policy, under the share
/// of the rounds in each bucket; then the preferred-category share by the same buckets.
pub fn visits(summaries: &[Summary]) -> String {
    let columns: Vec<String> = VISIT_BUCKETS
        .iter()
        .enumerate()
        .map(|(k, &from)| match VISIT_BUCKETS.get(k + 1) {
            Some(&next) if next == from + 1 => format!("{}", from + 1),
            Some(&next) => format!("{}-{}", from + 1, next),
            None => format!("{}+", from + 1),
        })
        .collect();
    // Every policy meets the same traffic: the first one's shares are everyone's.
    let above: Vec<(&str, Vec<f64>)> = summaries
        .first()
        .map(|first| {
            let total = first.impressions_by_visit.iter().sum::<u64>().max(1) as f64;
            let shares = first
                .impressions_by_visit
                .iter()
                .map(|&imp| imp as f64 / total)
                .collect();
            ("share of rounds", shares)
        })
        .into_iter()
        .collect();
    let mut out = share_table("CTR by visit", &columns, &above, summaries, |s| {
        &s.ctr_by_visit
    });
    out.push_str(&share_table(
        "pref-cat by visit",
        &columns,
        &[],
        summaries,
        |s| &s.preferred_by_visit,
    ));
    out
}

/// The terms of the click logit of each policy's served slots (see
/// [`Summary::logit_terms`]), one row per policy: what its CTR is made of, and where it
/// falls short of the oracle's.
pub fn logit_terms<'a>(rows: impl IntoIterator<Item = (&'a str, LogitTerms)>) -> String {
    let rows: Vec<(&str, LogitTerms)> = rows.into_iter().collect();
    let title = "click logit, 2nd half";
    let width = name_width(rows.iter().map(|(name, _)| *name), title);
    let mut out = format!(
        "{title:<width$}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}\n",
        "appeal", "taste", "affinity", "context", "sum"
    );
    for (name, t) in rows {
        out.push_str(&format!(
            "{name:<width$}  {:>8.3}  {:>8.3}  {:>8.3}  {:>8.3}  {:>8.3}\n",
            t.appeal,
            t.taste,
            t.affinity,
            t.context,
            t.sum()
        ));
    }
    out
}

/// The mean and the standard error of the mean of `values` (0 for a single value).
pub fn mean_and_error(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, (var / n as f64).sqrt())
}

/// What several seeds' runs of the same policies show: per policy, the mean and standard
/// error over the seeds of CTR, reward per impression and cumulative regret, the mean
/// preferred-category share, each seed's CTR, and, with `uniform` and `oracle` among the
/// policies, the share of the gap between their CTRs each other policy closed.
pub fn across_seeds(runs: &[(u64, Vec<Summary>)]) -> String {
    let Some((_, first)) = runs.first() else {
        return String::new();
    };
    let policies: Vec<&str> = first.iter().map(|s| s.policy.as_str()).collect();
    let of = |policy: &str| -> Vec<&Summary> {
        runs.iter()
            .filter_map(|(_, summaries)| summaries.iter().find(|s| s.policy == policy))
            .collect()
    };
    let width = name_width(policies.iter().copied(), "CTR by seed");
    let mut out = format!(
        "{:<width$}  {:>5}  {:>16}  {:>8}  {:>18}  {:>20}\n",
        "policy",
        "seeds",
        "CTR (± s.e.)",
        "pref-cat",
        "reward/imp (± s.e.)",
        "cum. regret (± s.e.)",
    );
    for &policy in &policies {
        let runs = of(policy);
        let stat =
            |f: fn(&Summary) -> f64| mean_and_error(&runs.iter().map(|s| f(s)).collect::<Vec<_>>());
        let (ctr, ctr_se) = stat(|s| 100.0 * s.ctr);
        let (pref, _) = stat(|s| 100.0 * s.preferred_share);
        let (reward, reward_se) = stat(|s| s.reward_per_impression);
        let (regret, regret_se) = stat(|s| s.cumulative_regret);
        out.push_str(&format!(
            "{policy:<width$}  {:>5}  {:>16}  {:>7.1}%  {:>18}  {:>20}\n",
            runs.len(),
            format!("{ctr:.2}% ± {ctr_se:.2}"),
            pref,
            format!("{reward:.4} ± {reward_se:.4}"),
            format!("{regret:.0} ± {regret_se:.0}"),
        ));
    }
    out.push_str(&format!("{:<width$}", "CTR by seed"));
    for (seed, _) in runs {
        out.push_str(&format!("  {seed:>6}"));
    }
    out.push('\n');
    for &policy in &policies {
        out.push_str(&format!("{policy:<width$}"));
        for s in of(policy) {
            out.push_str(&format!("  {:>5.2}%", 100.0 * s.ctr));
        }
        out.push('\n');
    }
    let (uniform, oracle) = (of("uniform"), of("oracle"));
    if uniform.len() == runs.len() && oracle.len() == runs.len() {
        out.push_str("gap closed: (CTR − uniform's) / (oracle's − uniform's), mean ± s.e.\n");
        for &policy in policies
            .iter()
            .filter(|&&p| p != "uniform" && p != "oracle")
        {
            let closed: Vec<f64> = of(policy)
                .iter()
                .zip(uniform.iter().zip(&oracle))
                .map(|(s, (u, o))| 100.0 * (s.ctr - u.ctr) / (o.ctr - u.ctr).max(1e-12))
                .collect();
            let (mean, se) = mean_and_error(&closed);
            out.push_str(&format!("{policy:<width$}  {mean:>5.1}% ± {se:.1}\n"));
        }
    }
    out.push_str(&logit_terms(policies.iter().map(|&policy| {
        let runs = of(policy);
        let mut sum = LogitTerms::default();
        for s in &runs {
            sum.add(&s.logit_terms);
        }
        (policy, sum.scaled(1.0 / runs.len().max(1) as f64))
    })));
    out
}

/// One point of a curve in the JSON report.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CurvePoint {
    /// Rounds run (1-based).
    pub round: usize,
    /// Expected reward per round, moving average.
    pub reward_per_round: f64,
    /// Cumulative regret.
    pub cumulative_regret: f64,
}

/// A policy in the JSON report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyReport {
    /// Its totals.
    #[serde(flatten)]
    pub summary: Summary,
    /// Its curves, thinned.
    pub curve: Vec<CurvePoint>,
}

/// Everything `onrec simulate --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The world.
    pub world: WorldConfig,
    /// Items per slate.
    pub n: u32,
    /// Candidates the ranker proposes.
    pub candidates: usize,
    /// Whether the popularity ranker moves with feedback.
    pub popularity_learns: bool,
    /// Whether purchased items are hidden from their buyers.
    pub hide_purchased: onrec_engine::HidePurchased,
    /// Rewards per event.
    pub rewards: Rewards,
    /// Parameters of the bandit policies.
    pub params: PolicyParams,
    /// How `+q` policies use the Q-network.
    pub q: QParams,
    /// The moving-average window of `reward_per_round` in the curves.
    pub window: usize,
    /// The encoder, when a policy used it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoder: Option<EncoderReport>,
    /// The policies, in the order run.
    pub policies: Vec<PolicyReport>,
}

impl Report {
    /// The report of `runs` in `sim`.
    pub fn new(sim: &Simulation, encoder: Option<&EncoderReport>, runs: &[PolicyRun]) -> Self {
        let config = sim.config();
        let w = &config.engine.weights;
        let rounds = runs.first().map_or(0, |r| r.expected.len());
        let window = window(rounds);
        Self {
            world: sim.world().config().clone(),
            n: config.n,
            candidates: config.engine.candidates,
            popularity_learns: [w.impression, w.click, w.add_to_cart, w.purchase, w.dislike]
                .iter()
                .any(|&x| x != 0.0),
            hide_purchased: config.engine.hide_purchased,
            rewards: Rewards::of(&config.engine),
            params: config.params,
            q: config.q,
            window,
            encoder: encoder.cloned(),
            policies: runs
                .iter()
                .map(|run| {
                    let reward = moving_average(&run.expected, window);
                    let regret = run.cumulative_regret();
                    PolicyReport {
                        summary: run.summary.clone(),
                        curve: thin(reward.len(), JSON_POINTS)
                            .map(|i| CurvePoint {
                                round: i + 1,
                                reward_per_round: reward[i],
                                cumulative_regret: regret[i],
                            })
                            .collect(),
                    }
                })
                .collect(),
        }
    }
}

fn plot_err(e: impl std::fmt::Display) -> SimError {
    SimError::Plot(e.to_string())
}

/// Draws reward per round (moving average; the oracle's in black) and cumulative regret
/// over rounds, one line per policy, into an SVG file at `path`.
pub fn plot_svg(runs: &[PolicyRun], path: &Path) -> Result<(), SimError> {
    let rounds = runs.iter().map(|r| r.expected.len()).max().unwrap_or(0);
    if rounds == 0 {
        return Err(SimError::Plot("there are no rounds to plot".into()));
    }
    let window = window(rounds);
    let rewards: Vec<Vec<f64>> = runs
        .iter()
        .map(|r| moving_average(&r.expected, window))
        .collect();
    let oracle = runs
        .first()
        .map(|r| moving_average(&r.oracle, window))
        .unwrap_or_default();
    let regrets: Vec<Vec<f64>> = runs.iter().map(PolicyRun::cumulative_regret).collect();
    let top = |series: &[Vec<f64>]| {
        series
            .iter()
            .flatten()
            .copied()
            .fold(0.0_f64, f64::max)
            .max(1e-9)
            * 1.05
    };
    let reward_max = top(&[rewards.concat(), oracle.clone()]);
    let regret_max = top(&regrets);

    let root = SVGBackend::new(path, (1200, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (upper, lower) = root.split_vertically(500);
    let x_max = rounds as f64;

    let mut chart = ChartBuilder::on(&upper)
        .caption(
            format!("Expected reward per round (moving average over {window} rounds)"),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..reward_max)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("expected reward per round")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(LineSeries::new(line(&oracle), BLACK.stroke_width(2)))
        .map_err(plot_err)?
        .label("oracle")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    draw_policies(&mut chart, runs, &rewards, SeriesLabelPosition::LowerRight)?;

    let mut chart = ChartBuilder::on(&lower)
        .caption("Cumulative regret against the oracle", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..regret_max)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("cumulative regret (expected reward)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(plot_err)?;
    draw_policies(&mut chart, runs, &regrets, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// A chart of the plot: rounds against a value, both as f64.
type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A series as plot points (round from 1, value), thinned to at most [`PLOT_POINTS`].
fn line(values: &[f64]) -> Vec<(f64, f64)> {
    thin(values.len(), PLOT_POINTS)
        .map(|i| ((i + 1) as f64, values[i]))
        .collect()
}

/// One line per policy, in its palette colour, and the legend at `legend`.
fn draw_policies<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    runs: &[PolicyRun],
    series: &[Vec<f64>],
    legend: SeriesLabelPosition,
) -> Result<(), SimError> {
    for (k, (run, values)) in runs.iter().zip(series).enumerate() {
        let color = Palette99::pick(k).to_rgba();
        chart
            .draw_series(LineSeries::new(line(values), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(run.summary.policy.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(legend)
        .draw()
        .map_err(plot_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(policy: &str, ctr: f64, regret: f64) -> Summary {
        Summary {
            policy: policy.to_owned(),
            rounds: 100,
            impressions: 500,
            clicks: (ctr * 500.0).round() as u64,
            ctr,
            reward: 0.0,
            reward_per_impression: 2.0 * ctr,
            reward_per_round: 0.0,
            expected_reward_per_round: 0.0,
            oracle_reward_per_round: 0.0,
            cumulative_regret: regret,
            final_regret_per_round: 0.0,
            encoder_rounds: 0,
            q_rounds: 0,
            preferred_share: 0.25,
            ctr_by_tenth: vec![ctr; 10],
            ctr_by_visit: vec![ctr; VISIT_BUCKETS.len()],
            preferred_by_visit: vec![0.1, 0.2, 0.3, 0.3, 0.0],
            impressions_by_visit: vec![300, 100, 50, 50, 0],
            logit_terms: LogitTerms {
                appeal: ctr,
                taste: 2.0 * ctr,
                affinity: 0.0,
                context: -ctr,
            },
            encoder_versions: None,
            learner: None,
            wall_seconds: 1.0,
        }
    }

    #[test]
    fn means_come_with_their_standard_errors() {
        let (mean, se) = mean_and_error(&[2.0, 4.0, 6.0]);
        assert!((mean - 4.0).abs() < 1e-12);
        assert!((se - 2.0 / 3f64.sqrt()).abs() < 1e-12, "{se}");
        assert_eq!(mean_and_error(&[5.0]), (5.0, 0.0));
        assert_eq!(mean_and_error(&[]), (0.0, 0.0));
    }

    #[test]
    fn seeds_are_summarised_per_policy_with_the_gap_closed() {
        let runs = vec![
            (
                1,
                vec![
                    summary("uniform", 0.01, 300.0),
                    summary("onrec", 0.05, 200.0),
                    summary("oracle", 0.11, 0.0),
                ],
            ),
            (
                2,
                vec![
                    summary("uniform", 0.02, 310.0),
                    summary("onrec", 0.08, 180.0),
                    summary("oracle", 0.12, 0.0),
                ],
            ),
        ];
        let out = across_seeds(&runs);
        let line = |start: &str| {
            out.lines()
                .find(|l| l.starts_with(start))
                .unwrap_or_else(|| panic!("no line '{start}' in\n{out}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        // CTR 5% and 8%: mean 6.5%, standard error 1.5 points; regret 190 ± 10.
        assert_eq!(
            line("onrec "),
            "onrec 2 6.50% ± 1.50 25.0% 0.1300 ± 0.0300 190 ± 10"
        );
        assert_eq!(line("CTR by seed"), "CTR by seed 1 2");
        assert_eq!(
            line("uniform "),
            "uniform 2 1.50% ± 0.50 25.0% 0.0300 ± 0.0100 305 ± 5"
        );
        // Gap closed: 4/10 and 6/10 of the way from uniform to the oracle.
        let above_terms = || out.lines().take_while(|l| !l.starts_with("click logit"));
        let gap: Vec<&str> = above_terms().filter(|l| l.starts_with("onrec")).collect();
        assert_eq!(gap.len(), 3, "{out}");
        assert_eq!(
            gap[2].split_whitespace().collect::<Vec<_>>(),
            ["onrec", "50.0%", "±", "10.0"]
        );
        // Only the policies between the two ends get a gap line.
        let after = above_terms()
            .skip_while(|l| !l.starts_with("gap closed"))
            .count();
        assert_eq!(after, 2, "{out}");
        // The logit terms, averaged over the seeds.
        let terms: Vec<Vec<&str>> = out
            .lines()
            .skip_while(|l| !l.starts_with("click logit"))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            terms[0],
            [
                "click", "logit,", "2nd", "half", "appeal", "taste", "affinity", "context", "sum"
            ]
        );
        assert_eq!(
            terms[2],
            ["onrec", "0.065", "0.130", "0.000", "-0.065", "0.130"]
        );
        assert_eq!(terms.len(), 4, "{out}");
        assert_eq!(across_seeds(&[]), "");
    }

    #[test]
    fn the_visit_table_shows_each_buckets_share_of_rounds() {
        let out = visits(&[summary("onrec", 0.05, 0.0)]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["CTR", "by", "visit", "1", "2-3", "4-7", "8-15", "16+"]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "share", "of", "rounds", "60.00%", "20.00%", "10.00%", "10.00%", "0.00%"
            ]
        );
        assert!(lines[2].starts_with("onrec"), "{out}");
        assert_eq!(
            lines[3].split_whitespace().collect::<Vec<_>>(),
            ["pref-cat", "by", "visit", "1", "2-3", "4-7", "8-15", "16+"]
        );
        assert_eq!(
            lines[4].split_whitespace().collect::<Vec<_>>(),
            ["onrec", "10.00%", "20.00%", "30.00%", "30.00%", "0.00%"]
        );
    }

    #[test]
    fn moving_averages_and_thinning() {
        assert_eq!(
            moving_average(&[1.0, 3.0, 5.0, 7.0], 2),
            vec![1.0, 2.0, 4.0, 6.0]
        );
        let idx: Vec<usize> = thin(10, 3).collect();
        assert_eq!(idx, vec![0, 4, 8, 9]);
        assert_eq!(thin(2, 1000).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(window(100_000), 2000);
        assert_eq!(window(10), 1);
    }
}
