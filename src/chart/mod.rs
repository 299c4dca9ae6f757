//! PNG charts drawn with plotters. Text is set in DejaVu Sans, built into the binary, so a
//! chart looks the same on a box without any system fonts.

pub mod calibration;
pub mod latency;

use std::sync::OnceLock;

use plotters::style::{register_font, FontStyle};

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("the built-in chart font failed to load")]
    Font,
    #[error("failed to draw the chart {path}: {message}")]
    Draw { path: String, message: String },
}

/// Makes the built-in font plotters' `sans-serif`. Safe to call more than once.
fn register_fonts() -> Result<(), ChartError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let registered = REGISTERED.get_or_init(|| {
        register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    if *registered {
        Ok(())
    } else {
        Err(ChartError::Font)
    }
}
