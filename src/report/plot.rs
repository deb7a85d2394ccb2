//! `loss_curve.png`: train and eval loss against the step, the learning rate on a second y axis,
//! drawn from the records of `metrics.jsonl` with plotters and encoded as PNG. The font is
//! embedded (DejaVu Sans, `assets/fonts/`), so drawing needs no system fonts.

use crate::{Error, Result};
use plotters::prelude::*;
use serde_json::Value;
use std::path::Path;
use std::sync::OnceLock;

/// Width of the image in pixels.
pub const WIDTH: u32 = 1000;
/// Height of the image in pixels.
pub const HEIGHT: u32 = 560;

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
const EVAL_COLOR: RGBColor = RGBColor(255, 127, 14);
const LR_COLOR: RGBColor = RGBColor(110, 110, 110);

/// Makes the embedded font plotters' `sans-serif` (once per process).
fn register_font() -> std::result::Result<(), String> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
                .map_err(|_| "the embedded DejaVu Sans font did not load".to_string())
        })
        .clone()
}

/// The (step, value) points of `key` in the records that have both.
fn series(records: &[Value], key: &str) -> Vec<(i64, f64)> {
    records
        .iter()
        .filter_map(|r| {
            let step = r.get("step")?.as_i64()?;
            let value = r.get(key)?.as_f64()?;
            value.is_finite().then_some((step, value))
        })
        .collect()
}

/// `lo..hi` padded by 5% on each side; a single value gets a band around it.
fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.05
    } else {
        (hi.abs() * 0.05).max(1e-3)
    };
    (lo - pad)..(hi + pad)
}

/// Decimals that tell apart ticks about `span / 8` apart.
fn decimals(span: f64) -> usize {
    if span <= 0.0 {
        return 3;
    }
    (-(span / 8.0).log10()).ceil().clamp(0.0, 8.0) as usize
}

/// Draws train loss (`loss`) and eval loss (`eval_loss`) against `step`, and `learning_rate` on
/// the right axis, into a PNG at `out` (written to a temporary file, then renamed). `records` are
/// the lines of `metrics.jsonl`; records without the keys are skipped.
pub fn draw_loss_curve(records: &[Value], out: &Path) -> Result<()> {
    let png = render_loss_curve(records).map_err(|message| Error::Parse {
        path: out.to_path_buf(),
        line: None,
        message,
    })?;
    crate::io::write_bytes(out, &png)
}

/// The PNG bytes of [`draw_loss_curve`]'s chart.
fn render_loss_curve(records: &[Value]) -> std::result::Result<Vec<u8>, String> {
    let train = series(records, "loss");
    let eval = series(records, "eval_loss");
    let lr = series(records, "learning_rate");
    if train.is_empty() && eval.is_empty() {
        return Err(
            "no record has `loss` or `eval_loss` with a `step`: nothing to plot (train with \
             --logging-steps smaller than --max-steps, or check that this is a peft-sft \
             metrics.jsonl)"
                .into(),
        );
    }
    register_font()?;
    let all = train.iter().chain(&eval);
    let (first_step, last_step) = all
        .clone()
        .chain(&lr)
        .fold((i64::MAX, i64::MIN), |(lo, hi), &(s, _)| {
            (lo.min(s), hi.max(s))
        });
    let steps = if first_step == last_step {
        (first_step - 1)..(last_step + 1)
    } else {
        first_step..last_step
    };
    let (loss_lo, loss_hi) = all.fold((f64::MAX, f64::MIN), |(lo, hi), &(_, v)| {
        (lo.min(v), hi.max(v))
    });
    let loss_range = padded(loss_lo, loss_hi);
    let loss_decimals = decimals(loss_range.end - loss_range.start);
    let lr_max = lr.iter().map(|&(_, v)| v).fold(0.0, f64::max);
    let lr_range = 0.0..if lr_max > 0.0 { lr_max * 1.05 } else { 1.0 };

    let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        let fail = |e: &dyn std::fmt::Display| format!("cannot draw the loss curve: {e}");
        root.fill(&WHITE).map_err(|e| fail(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Loss and learning rate", ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .right_y_label_area_size(80)
            .build_cartesian_2d(steps.clone(), loss_range)
            .map_err(|e| fail(&e))?
            .set_secondary_coord(steps, lr_range);
        chart
            .configure_mesh()
            .light_line_style(WHITE.mix(0.0))
            .bold_line_style(BLACK.mix(0.08))
            .x_desc("step")
            .y_desc("loss")
            .y_label_formatter(&|v| format!("{v:.loss_decimals$}"))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .draw()
            .map_err(|e| fail(&e))?;
        chart
            .configure_secondary_axes()
            .y_desc("learning rate")
            .y_label_formatter(&|&v| {
                if v == 0.0 {
                    "0".into()
                } else {
                    format!("{v:.1e}")
                }
            })
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .draw()
            .map_err(|e| fail(&e))?;
        if !train.is_empty() {
            let style = TRAIN_COLOR.stroke_width(2);
            chart
                .draw_series(LineSeries::new(train.iter().copied(), style))
                .map_err(|e| fail(&e))?
                .label("train loss")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        if !eval.is_empty() {
            let style = EVAL_COLOR.stroke_width(2);
            chart
                .draw_series(LineSeries::new(eval.iter().copied(), style))
                .map_err(|e| fail(&e))?
                .label("eval loss")
                .legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (20, 0)], style)
                        + Circle::new((10, 0), 4, EVAL_COLOR.filled())
                });
        }
        if !lr.is_empty() {
            let style = LR_COLOR.stroke_width(2);
            chart
                .draw_secondary_series(DashedLineSeries::new(lr.iter().copied(), 6, 4, style))
                .map_err(|e| fail(&e))?
                .label("learning rate (right axis)")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        // Markers last, so the learning-rate line does not cover them.
        chart
            .draw_series(
                eval.iter()
                    .map(|&point| Circle::new(point, 4, EVAL_COLOR.filled())),
            )
            .map_err(|e| fail(&e))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| fail(&e))?;
        root.present().map_err(|e| fail(&e))?;
    }
    encode_png(&rgb, WIDTH, HEIGHT).map_err(|e| format!("cannot encode the PNG: {e}"))
}

/// An 8-bit RGB buffer as PNG bytes.
fn encode_png(
    rgb: &[u8],
    width: u32,
    height: u32,
) -> std::result::Result<Vec<u8>, png::EncodingError> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Width and height from a PNG's IHDR chunk, after checking the signature.
    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR");
        let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
        (be(16), be(20))
    }

    #[test]
    fn draws_a_png_and_refuses_records_without_loss() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("loss_curve.png");
        let records = vec![
            json!({"loss": 2.0, "learning_rate": 1e-4, "step": 1}),
            json!({"loss": 1.5, "learning_rate": 5e-5, "step": 2}),
            json!({"eval_loss": 1.7, "step": 2}),
            json!({"loss": 1.2, "learning_rate": 0.0, "step": 3}),
        ];
        draw_loss_curve(&records, &out).unwrap();
        assert_eq!(png_size(&std::fs::read(&out).unwrap()), (WIDTH, HEIGHT));

        // One point only (e.g. the first eval) still draws.
        draw_loss_curve(&records[2..3], &out).unwrap();

        let err = draw_loss_curve(&[json!({"grad_norm": 1.0, "step": 1})], &out)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("loss_curve.png") && err.contains("nothing to plot"),
            "{err}"
        );
    }

    #[test]
    fn tick_decimals_follow_the_span() {
        assert_eq!(decimals(5.0), 1);
        assert_eq!(decimals(0.05), 3);
        assert_eq!(decimals(80.0), 0);
    }
}
