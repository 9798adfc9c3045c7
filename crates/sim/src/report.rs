//! What a simulation shows: a table per policy, the results as JSON, and an SVG plot of
//! reward per round and cumulative regret over time.

use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use serde::Serialize;

use crate::SimError;
use crate::encoder::EncoderReport;
use crate::run::{PolicyRun, QParams, Simulation, Summary};
use crate::spec::PolicyParams;
use crate::world::{Rewards, WorldConfig};

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

/// The table of results, one row per policy.
pub fn table(summaries: &[Summary]) -> String {
    let width = summaries
        .iter()
        .map(|s| s.policy.len())
        .max()
        .unwrap_or(0)
        .max("policy".len());
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

/// CTR by tenth of the run, one row per policy.
pub fn tenths(summaries: &[Summary]) -> String {
    let width = summaries
        .iter()
        .map(|s| s.policy.len())
        .max()
        .unwrap_or(0)
        .max("CTR by tenth".len());
    let mut out = format!("{:<width$}", "CTR by tenth");
    for k in 1..=10 {
        out.push_str(&format!("  {:>6}", format!("{}0%", k)));
    }
    out.push('\n');
    for s in summaries {
        out.push_str(&format!("{:<width$}", s.policy));
        for ctr in &s.ctr_by_tenth {
            out.push_str(&format!("  {:>5.2}%", 100.0 * ctr));
        }
        out.push('\n');
    }
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
