//! The loss curve as an SVG file (plotters' SVG backend, no fonts needed).

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};

/// Draws training loss per step and validation loss at its steps.
pub fn loss_curve(path: &Path, train: &[(u64, f64)], val: &[(u64, f64)], title: &str) -> Result<()> {
    let err = |e: String| Error::Format(format!("plotting {}: {e}", path.display()));
    let finite = train.iter().chain(val).map(|p| p.1).filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return Err(err("no finite losses to plot".into()));
    }
    let last = train.iter().chain(val).map(|p| p.0).max().unwrap_or(1).max(1);
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0u64..last, (lo * 0.95)..(hi * 1.02))
        .map_err(|e| err(e.to_string()))?;
    chart.configure_mesh().x_desc("step").y_desc("loss (nats)").draw().map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(LineSeries::new(train.iter().copied().filter(|p| p.1.is_finite()), &BLUE))
        .map_err(|e| err(e.to_string()))?
        .label("train")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)))
        .map_err(|e| err(e.to_string()))?
        .label("validation")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart.configure_series_labels().border_style(BLACK).draw().map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}
