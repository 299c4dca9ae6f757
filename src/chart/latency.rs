//! The chart of `tierd bench serve`: p50, p90 and p99 of time to first token and of end-to-end
//! latency against request rate, one colour per endpoint, one panel per latency.

use std::path::Path;

use plotters::prelude::*;

use super::{register_fonts, ChartError};

const WIDTH: u32 = 1280;
const HEIGHT: u32 = 600;
/// Colours of the endpoints in order, repeated past the sixth.
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Latency percentiles at one load level, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct LatencyPoint {
    /// Request rate, in requests per second.
    pub rate: f64,
    /// p50, p90 and p99 of time to first token.
    pub ttft: Option<[f64; 3]>,
    /// p50, p90 and p99 of end-to-end latency.
    pub e2e: Option<[f64; 3]>,
}

/// One endpoint's line.
pub struct EndpointSeries {
    pub name: String,
    pub points: Vec<LatencyPoint>,
}

/// Contents of the chart.
pub struct LatencyChart {
    pub title: String,
    /// Description of the x axis, such as `offered request rate (req/s)`.
    pub x_label: String,
    pub endpoints: Vec<EndpointSeries>,
}

/// Draws `chart` as a PNG at `path`.
pub fn draw(chart: &LatencyChart, path: &Path) -> Result<(), ChartError> {
    register_fonts()?;
    draw_png(chart, path).map_err(|e| ChartError::Draw {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

type Panel = fn(&LatencyPoint) -> Option<[f64; 3]>;

fn draw_png(chart: &LatencyChart, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(&chart.title, ("sans-serif", 22))?;
    let (left, right) = root.split_horizontally(WIDTH / 2);
    let panels: [(&str, Panel, DrawingArea<BitMapBackend, _>); 2] = [
        ("time to first token (ms)", |p| p.ttft, left),
        ("end-to-end latency (ms)", |p| p.e2e, right),
    ];
    for (label, values, area) in panels {
        draw_panel(chart, &area, label, values)?;
    }
    root.present()?;
    Ok(())
}

fn draw_panel(
    chart: &LatencyChart,
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    y_label: &str,
    values: Panel,
) -> Result<(), Box<dyn std::error::Error>> {
    let points = || chart.endpoints.iter().flat_map(|e| e.points.iter());
    let x_max = points().map(|p| p.rate).fold(0.0_f64, f64::max);
    let y_max = points().filter_map(values).flat_map(|v| v.into_iter()).fold(0.0_f64, f64::max);
    // Some room above the highest point and right of the highest rate; a run where every
    // request failed still gets valid axes.
    let x_range = 0.0..(x_max * 1.1).max(1.0);
    let y_range = 0.0..(y_max * 1.1).max(1.0);

    let mut plot = ChartBuilder::on(area)
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range, y_range)?;
    plot.configure_mesh()
        .x_desc(chart.x_label.as_str())
        .y_desc(y_label)
        .axis_desc_style(("sans-serif", 16))
        .label_style(("sans-serif", 14))
        .draw()?;

    for (index, endpoint) in chart.endpoints.iter().enumerate() {
        let colour = PALETTE[index % PALETTE.len()];
        let mut sorted: Vec<(f64, [f64; 3])> = endpoint.points.iter().filter_map(|p| Some((p.rate, values(p)?))).collect();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        let line = |percentile: usize| sorted.iter().map(move |(rate, v)| (*rate, v[percentile])).collect::<Vec<_>>();

        plot.draw_series(LineSeries::new(line(0), colour.stroke_width(2)))?
            .label(endpoint.name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2)));
        plot.draw_series(line(0).into_iter().map(|point| Circle::new(point, 3, colour.filled())))?;
        // The title names the line styles, so only the p50 line gets a legend entry.
        plot.draw_series(DashedLineSeries::new(line(1), 8, 5, colour.stroke_width(2)))?;
        plot.draw_series(DashedLineSeries::new(line(2), 2, 4, colour.stroke_width(2)))?;
        plot.draw_series(line(2).into_iter().map(|point| TriangleMarker::new(point, 4, colour.filled())))?;
    }
    plot.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}
