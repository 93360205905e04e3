//! Results: one row per figure with its baseline and the ratio, printed as a table and written
//! as JSON.

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// B1..B6.
    pub bench: String,
    /// What was measured (scale included).
    pub case: String,
    pub value: f64,
    pub unit: String,
    /// What it is compared with, measured in the same run.
    pub baseline: String,
    pub baseline_value: f64,
    /// value / baseline_value.
    pub ratio: f64,
    /// The goal for this figure, if any, and whether it was met.
    pub goal: Option<String>,
    pub goal_met: Option<bool>,
}

impl Row {
    pub fn new(
        bench: &str,
        case: String,
        value: f64,
        unit: &str,
        baseline: String,
        baseline_value: f64,
    ) -> Row {
        Row {
            bench: bench.into(),
            case,
            value,
            unit: unit.into(),
            baseline,
            baseline_value,
            ratio: value / baseline_value,
            goal: None,
            goal_met: None,
        }
    }

    pub fn goal(mut self, goal: &str, met: bool) -> Row {
        self.goal = Some(goal.into());
        self.goal_met = Some(met);
        self
    }
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
}

impl Machine {
    pub fn detect() -> Machine {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_default();
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        Machine {
            kernel,
            cpus,
            cpu_model,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub quick: bool,
    pub started_utc: String,
    pub rows: Vec<Row>,
    /// Benchmarks not run, with the reason.
    pub not_run: Vec<String>,
}

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

impl Report {
    pub fn table(&self) -> String {
        let mut lines = vec![[
            "bench".to_string(),
            "case".into(),
            "value".into(),
            "baseline".into(),
            "ratio".into(),
            "goal".into(),
        ]];
        for r in &self.rows {
            lines.push([
                r.bench.clone(),
                r.case.clone(),
                format!("{} {}", fmt_num(r.value), r.unit),
                format!("{} = {} {}", r.baseline, fmt_num(r.baseline_value), r.unit),
                format!("{}x", fmt_num(r.ratio)),
                match (&r.goal, r.goal_met) {
                    (Some(g), Some(true)) => format!("{g}: met"),
                    (Some(g), _) => format!("{g}: NOT met"),
                    _ => String::new(),
                },
            ]);
        }
        let widths: Vec<usize> = (0..6)
            .map(|i| {
                lines
                    .iter()
                    .map(|l| l[i].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for (n, l) in lines.iter().enumerate() {
            let cells: Vec<String> = l
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
            if n == 0 {
                let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
                out.push_str(&"-".repeat(total));
                out.push('\n');
            }
        }
        out
    }
}
