//! `sdengine plot`: the PNG has the requested size and decodes, each series is drawn where its
//! data says (checked on the pixels of its colour), runs overlay, the legend appears only when
//! asked, and bad metrics files fail with the file and line named.

use std::path::{Path, PathBuf};

use sdengine::train::plot::{plot_runs, read_metrics, PlotOptions, PALETTE};

/// Writes `lines` as `<dir>/<name>/metrics.jsonl` and returns the run folder.
fn run(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let r = dir.join(name);
    std::fs::create_dir_all(&r).unwrap();
    std::fs::write(r.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
    r
}

/// A run with a per-step `train_loss` (fractional epochs 0..=10 in steps of 0.5) following
/// `loss(epoch)` and per-epoch `val_acc1` values at epochs 1, 2, 3, ...
fn lines(loss: impl Fn(f64) -> f64, acc: &[f64]) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..=20 {
        let e = i as f64 * 0.5;
        out.push(format!(
            r#"{{"epoch": {e}, "step": {}, "train_loss": {}, "lr": 0.1}}"#,
            i * 10,
            loss(e)
        ));
    }
    for (i, a) in acc.iter().enumerate() {
        out.push(format!(
            r#"{{"epoch": {}, "step": {}, "val_acc1": {a}, "val_acc5": "n/a"}}"#,
            i + 1,
            (i + 1) * 20
        ));
    }
    out
}

struct Png {
    w: usize,
    h: usize,
    rgb: Vec<u8>,
}

fn decode(path: &Path) -> Png {
    let file = std::fs::File::open(path).unwrap();
    let mut dec = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap();
    let mut buf = vec![0u8; dec.output_buffer_size().unwrap()];
    let info = dec.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    buf.truncate(info.buffer_size());
    Png {
        w: info.width as usize,
        h: info.height as usize,
        rgb: buf,
    }
}

impl Png {
    /// (x, y) of every pixel of exactly `c`.
    fn pixels_of(&self, c: (u8, u8, u8)) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for y in 0..self.h {
            for x in 0..self.w {
                let i = (y * self.w + x) * 3;
                if (self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]) == c {
                    out.push((x, y));
                }
            }
        }
        out
    }
}

/// Mean screen y of the pixels in the leftmost / rightmost `band` columns of `px`.
fn end_heights(px: &[(usize, usize)], band: usize) -> (f64, f64) {
    let xmin = px.iter().map(|p| p.0).min().unwrap();
    let xmax = px.iter().map(|p| p.0).max().unwrap();
    let mean = |sel: Vec<usize>| sel.iter().sum::<usize>() as f64 / sel.len() as f64;
    let left = mean(
        px.iter()
            .filter(|p| p.0 < xmin + band)
            .map(|p| p.1)
            .collect(),
    );
    let right = mean(
        px.iter()
            .filter(|p| p.0 + band > xmax)
            .map(|p| p.1)
            .collect(),
    );
    (left, right)
}

fn no_legend() -> PlotOptions {
    PlotOptions {
        width: 800,
        height: 600,
        legend: false,
        ..PlotOptions::default()
    }
}

#[test]
fn png_has_the_requested_size_and_decodes() {
    let tmp = tempfile::tempdir().unwrap();
    let a = run(
        tmp.path(),
        "suave",
        &lines(|e| 5.0 - 0.3 * e, &[10.0, 20.0, 30.0]),
    );
    let out = tmp.path().join("plot.png");
    let opts = PlotOptions {
        width: 640,
        height: 480,
        title: Some("Suave on cifar10-mini".into()),
        ..PlotOptions::default()
    };
    plot_runs(&[a], &out, &opts).unwrap();
    let png = decode(&out);
    assert_eq!((png.w, png.h), (640, 480));
    // Not blank: white background plus a good share of other pixels (axes, text, lines).
    let non_white = png.rgb.chunks(3).filter(|p| *p != [255, 255, 255]).count();
    assert!(non_white > 2000, "{non_white} non-white pixels");
    // No temporary file is left beside the output.
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn series_pixels_are_where_the_data_says_and_runs_overlay() {
    let tmp = tempfile::tempdir().unwrap();
    // Run a: a rising loss and a validation curve that peaks at epoch 2.
    let a = run(
        tmp.path(),
        "a",
        &lines(|e| 1.0 + 0.1 * e, &[10.0, 60.0, 20.0]),
    );
    // Run b: a falling loss and a rising validation curve.
    let b = run(
        tmp.path(),
        "b",
        &lines(|e| 2.0 - 0.1 * e, &[15.0, 25.0, 35.0]),
    );
    let out = tmp.path().join("cmp.png");
    plot_runs(&[a, b], &out, &no_legend()).unwrap();
    let png = decode(&out);
    let half = png.h / 2;
    // Colours go in order (run a: train_loss, val_acc1; run b: train_loss, val_acc1).
    let a_loss = png.pixels_of(PALETTE[0]);
    let a_val = png.pixels_of(PALETTE[1]);
    let b_loss = png.pixels_of(PALETTE[2]);
    let b_val = png.pixels_of(PALETTE[3]);
    for (name, px) in [
        ("a_loss", &a_loss),
        ("a_val", &a_val),
        ("b_loss", &b_loss),
        ("b_val", &b_val),
    ] {
        assert!(px.len() > 50, "{name}: {} pixels", px.len());
    }
    // Losses in the upper panel, validation metrics in the lower one.
    assert!(a_loss.iter().chain(&b_loss).all(|p| p.1 < half));
    assert!(a_val.iter().chain(&b_val).all(|p| p.1 >= half));
    // A rising line: the left end is lower on screen (larger y) than the right end; falling:
    // the opposite. Both losses span epochs 0..10, so they start and end at the same columns.
    let (l, r) = end_heights(&a_loss, 6);
    assert!(l > r + 50.0, "rising loss: left y {l}, right y {r}");
    let (l, r) = end_heights(&b_loss, 6);
    assert!(l + 50.0 < r, "falling loss: left y {l}, right y {r}");
    // The two losses cross in the middle (1.5 at epoch 5): at the left, a (1.0) is below b (2.0).
    let (al, _) = end_heights(&a_loss, 6);
    let (bl, _) = end_heights(&b_loss, 6);
    assert!(al > bl + 50.0);
    // The validation curve of run a peaks at its middle point: the highest pixel (smallest y)
    // lies in the middle third of its horizontal extent, and both ends are lower.
    let xmin = a_val.iter().map(|p| p.0).min().unwrap();
    let xmax = a_val.iter().map(|p| p.0).max().unwrap();
    let top = a_val.iter().min_by_key(|p| p.1).unwrap();
    let third = (xmax - xmin) / 3;
    assert!(
        top.0 > xmin + third && top.0 < xmax - third,
        "peak at x {} of {xmin}..{xmax}",
        top.0
    );
    let (l, r) = end_heights(&a_val, 4);
    assert!(l > top.1 as f64 + 50.0 && r > top.1 as f64 + 50.0);
    // 60 is the top of the panel's data: the peak is near the top of the lower panel.
    assert!(
        top.1 < half + png.h / 8,
        "peak y {} of panel {half}..{}",
        top.1,
        png.h
    );
    // Run b's validation curve rises.
    let (bl, br) = end_heights(&b_val, 4);
    assert!(
        bl > br + 50.0,
        "rising validation: left y {bl}, right y {br}"
    );
}

#[test]
fn legend_is_drawn_only_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    // A loss that drops at once and stays low: the upper right of the loss panel holds no data.
    let a = run(
        tmp.path(),
        "a",
        &lines(|e| if e < 1.0 { 2.0 } else { 1.0 }, &[1.0, 2.0]),
    );
    let with = tmp.path().join("with.png");
    let without = tmp.path().join("without.png");
    plot_runs(
        std::slice::from_ref(&a),
        &with,
        &PlotOptions {
            legend: true,
            ..no_legend()
        },
    )
    .unwrap();
    plot_runs(&[a], &without, &no_legend()).unwrap();
    let (pw, po) = (decode(&with), decode(&without));
    let in_corner = |png: &Png| {
        png.pixels_of(PALETTE[0])
            .into_iter()
            .filter(|&(x, y)| x > png.w / 2 && y < png.h / 4)
            .count()
    };
    assert!(
        in_corner(&pw) >= 20,
        "legend swatch: {} pixels",
        in_corner(&pw)
    );
    assert_eq!(in_corner(&po), 0);
}

#[test]
fn read_metrics_keeps_numeric_keys_and_ignores_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let r = run(
        tmp.path(),
        "r",
        &[
            r#"{"epoch": 0.25, "step": 1, "train_loss": 3.5, "note": "warmup", "lr": 0.01}"#.into(),
            String::new(),
            r#"{"epoch": 0.5, "step": 2, "train_loss": "oops", "val_acc1": null, "extra": {"a": 1}}"#.into(),
            r#"{"epoch": 1, "step": 4, "train_loss": 3.0, "val_acc1": 12.5}"#.into(),
        ],
    );
    let m = read_metrics(&r).unwrap();
    assert_eq!(m.name, "r");
    let keys: Vec<&str> = m.series.keys().map(String::as_str).collect();
    assert_eq!(keys, ["lr", "train_loss", "val_acc1"]);
    assert_eq!(m.series["train_loss"], [(0.25, 3.5), (1.0, 3.0)]);
    assert_eq!(m.series["val_acc1"], [(1.0, 12.5)]);
    // The file itself works as well as its folder.
    assert_eq!(read_metrics(&r.join("metrics.jsonl")).unwrap(), m);
}

#[test]
fn malformed_lines_error_with_file_and_line_number() {
    let tmp = tempfile::tempdir().unwrap();
    let good = r#"{"epoch": 0, "step": 0, "train_loss": 1.0}"#.to_string();
    let cases = [
        (
            "json",
            "{\"epoch\": 1, \"train_loss\": ",
            "line 3: not valid JSON",
        ),
        ("array", "[1, 2]", "line 3: expected a JSON object"),
        (
            "noepoch",
            "{\"step\": 3, \"train_loss\": 1.0}",
            "line 3: no numeric \"epoch\"",
        ),
        (
            "strepoch",
            "{\"epoch\": \"1\", \"train_loss\": 1.0}",
            "line 3: no numeric \"epoch\"",
        ),
    ];
    for (name, bad, want) in cases {
        let r = run(
            tmp.path(),
            name,
            &[good.clone(), good.clone(), bad.to_string(), good.clone()],
        );
        let out = tmp.path().join(format!("{name}.png"));
        let err = plot_runs(std::slice::from_ref(&r), &out, &no_legend())
            .unwrap_err()
            .to_string();
        let file = r.join("metrics.jsonl").display().to_string();
        assert!(err.contains(&file) && err.contains(want), "{name}: {err}");
        assert!(!out.exists());
    }
}

#[test]
fn empty_missing_or_unplottable_metrics_error_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("p.png");
    // Missing run folder.
    let missing = tmp.path().join("nope");
    let err = plot_runs(std::slice::from_ref(&missing), &out, &no_legend())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nope") && err.contains("metrics.jsonl"),
        "{err}"
    );
    // Empty file (blank lines only).
    let empty = run(tmp.path(), "empty", &[String::new()]);
    let err = plot_runs(&[empty], &out, &no_legend())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("empty") && err.contains("metrics.jsonl"),
        "{err}"
    );
    // Only keys that are neither losses nor validation metrics.
    let lr = run(
        tmp.path(),
        "lr",
        &[r#"{"epoch": 0, "step": 0, "lr": 0.1}"#.into()],
    );
    let err = plot_runs(&[lr], &out, &no_legend())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no numeric key ending in `loss`"), "{err}");
    // No run at all, and an absurd size.
    assert!(plot_runs(&[], &out, &no_legend()).is_err());
    let ok = run(
        tmp.path(),
        "ok",
        &[r#"{"epoch": 0, "step": 0, "train_loss": 1}"#.into()],
    );
    let tiny = PlotOptions {
        width: 10,
        ..no_legend()
    };
    let err = plot_runs(&[ok], &out, &tiny).unwrap_err().to_string();
    assert!(err.contains("10x600"), "{err}");
    assert!(!out.exists());
}

#[test]
fn a_single_point_and_a_missing_panel_still_draw() {
    let tmp = tempfile::tempdir().unwrap();
    // One line, a loss only: the loss panel shows a marker, the validation panel says why empty.
    let r = run(
        tmp.path(),
        "one",
        &[r#"{"epoch": 0, "step": 0, "train_loss": 2.0}"#.into()],
    );
    let out = tmp.path().join("one.png");
    plot_runs(&[r], &out, &no_legend()).unwrap();
    let png = decode(&out);
    let px = png.pixels_of(PALETTE[0]);
    assert!(px.len() >= 9, "marker pixels: {}", px.len());
    assert!(px.iter().all(|p| p.1 < png.h / 2));
}

/// `keys` keeps only the named metrics; a filter that matches nothing is an error.
#[test]
fn keys_select_the_series() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(
        run.join("metrics.jsonl"),
        "{\"epoch\":1,\"step\":1,\"train_loss\":2.0,\"val_acc1\":10}\n{\"epoch\":2,\"step\":2,\"train_loss\":1.0,\"val_acc1\":20}\n",
    )
    .unwrap();
    let out = dir.path().join("p.png");
    let only = PlotOptions {
        keys: vec!["val_acc1".into()],
        ..no_legend()
    };
    plot_runs(std::slice::from_ref(&run), &out, &only).unwrap();
    let none = PlotOptions {
        keys: vec!["val_acc5".into()],
        ..no_legend()
    };
    let err = plot_runs(&[run], &out, &none).unwrap_err().to_string();
    assert!(err.contains("--keys"), "{err}");
}
