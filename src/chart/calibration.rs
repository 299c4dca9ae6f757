//! The chart of `tierd calibrate`: accuracy (with its 95 % band) and coverage of the answers
//! kept at each confidence threshold, the target accuracy and the chosen threshold.

use std::path::Path;

use plotters::prelude::*;

use super::{register_fonts, ChartError};
use crate::classify::calibration::CurvePoint;

const WIDTH: u32 = 960;
const HEIGHT: u32 = 600;
const ACCURACY: RGBColor = RGBColor(31, 119, 180);
const BAND: RGBColor = RGBColor(174, 199, 232);
const COVERAGE: RGBColor = RGBColor(255, 127, 14);
const HELD_OUT: RGBColor = RGBColor(44, 160, 44);
const TARGET: RGBColor = RGBColor(100, 100, 100);
const CHOSEN: RGBColor = RGBColor(214, 39, 40);

/// Contents of the calibration chart.
pub struct CalibrationChart<'a> {
    pub title: String,
    /// Curve on the calibration data, highest threshold first, as `calibration::curve` returns.
    pub curve: &'a [CurvePoint],
    /// Curve on the held-out data, if any.
    pub held_out: Option<&'a [CurvePoint]>,
    pub target: f64,
    pub chosen: Option<f64>,
}

/// Draws `chart` as a PNG at `path`.
pub fn draw(chart: &CalibrationChart, path: &Path) -> Result<(), ChartError> {
    register_fonts()?;
    draw_png(chart, path).map_err(|e| ChartError::Draw {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn draw_png(chart: &CalibrationChart, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    // Start the axis at the lowest confidence seen, in steps of 0.1, so that binary tasks (whose
    // confidence is never below 0.5) do not waste half the width.
    let lowest = chart
        .curve
        .iter()
        .chain(chart.held_out.unwrap_or_default())
        .map(|p| p.threshold)
        .fold(1.0_f64, f64::min);
    let x_start = ((lowest * 10.0).floor() / 10.0).clamp(0.0, 0.9);

    let mut plot = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(56)
        .build_cartesian_2d(x_start..1.0, 0.0..1.0)?;
    plot.configure_mesh()
        .x_desc("confidence threshold (answers at or above it stay local)")
        .y_desc("share")
        .axis_desc_style(("sans-serif", 16))
        .label_style(("sans-serif", 14))
        .draw()?;

    // Lines run from the lowest threshold up, and carry each point's value to the next
    // threshold, because the kept set only changes at the curve's points.
    let ascending: Vec<&CurvePoint> = chart.curve.iter().rev().collect();
    let band: Vec<(f64, f64)> = ascending
        .iter()
        .map(|p| (p.threshold, p.upper))
        .chain(ascending.iter().rev().map(|p| (p.threshold, p.lower)))
        .collect();
    plot.draw_series(std::iter::once(Polygon::new(band, BAND.mix(0.6).filled())))?
        .label("95 % interval of the accuracy")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], BAND.filled()));
    plot.draw_series(LineSeries::new(
        ascending.iter().map(|p| (p.threshold, p.accuracy)),
        ACCURACY.stroke_width(2),
    ))?
    .label("accuracy of the answers kept")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], ACCURACY.stroke_width(2)));
    plot.draw_series(LineSeries::new(
        ascending.iter().map(|p| (p.threshold, p.coverage)),
        COVERAGE.stroke_width(2),
    ))?
    .label("coverage (share kept local)")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], COVERAGE.stroke_width(2)));
    if let Some(held_out) = chart.held_out {
        plot.draw_series(LineSeries::new(
            held_out.iter().rev().map(|p| (p.threshold, p.accuracy)),
            HELD_OUT.stroke_width(2),
        ))?
        .label("accuracy on the held-out data")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], HELD_OUT.stroke_width(2)));
    }
    plot.draw_series(DashedLineSeries::new(
        [(x_start, chart.target), (1.0, chart.target)],
        8,
        6,
        TARGET.stroke_width(1),
    ))?
    .label(format!("target accuracy {}", chart.target))
    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], TARGET.stroke_width(1)));
    if let Some(threshold) = chart.chosen {
        plot.draw_series(LineSeries::new(
            [(threshold, 0.0), (threshold, 1.0)],
            CHOSEN.stroke_width(2),
        ))?
        .label(format!("chosen threshold {threshold}"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], CHOSEN.stroke_width(2)));
    }
    plot.configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}
