//! A study's `report.md` and `chart.png`.
use image::{Rgb, RgbImage};
use softalign_worlds::geneval::Tag;

use super::study::{tags, Study};
use super::study_stats::{cell, difference, ArmResults, RESAMPLES};
use super::text::{draw_text, text_width};

fn tag_name(t: Option<Tag>) -> &'static str {
    t.map_or("overall", Tag::name)
}

fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.1}", 100.0 * x)
    } else {
        "-".into()
    }
}

pub fn report(
    study: &Study,
    arms: &[ArmResults],
    reference: usize,
    settings: &[(String, String)],
    commands: &[String],
    timings: &[(String, f64)],
) -> String {
    let mut s = format!("# Study `{}`\n\n**Claim.** {}\n\n", study.name, study.claim);
    s += "## How to read it\n\n";
    s += &format!(
        "Each trained arm was trained once per training seed and evaluated on the same held-out \
         prompts from the same noise; the base is evaluated once. A cell is the accuracy (%) \
         averaged over training seeds, with a 95% interval from a two-level bootstrap \
         ({RESAMPLES} resamples: training seeds, then images within each category), so it \
         includes the seed-to-seed variation. The difference table pairs each arm with the \
         reference `{}` seed by seed and image by image (same prompt, same noise): the mean \
         difference in points with its bootstrap interval, the images fixed / broken pooled \
         over seeds, and the exact McNemar p-value on those counts (which treats the seeds' \
         images as independent). An interval that holds 0 means the study could not tell the \
         arms apart at this power; its half-width is about the smallest effect it could have \
         shown. Images of one prompt are not independent, so intervals are somewhat narrow.\n\n",
        arms[reference].name
    );
    s += "## Accuracy (%)\n\n| arm | seeds |";
    for t in tags() {
        s += &format!(" {} |", tag_name(t));
    }
    s += "\n|---|---:|";
    for _ in tags() {
        s += "---|";
    }
    s += "\n";
    for (k, arm) in arms.iter().enumerate() {
        s += &format!("| {} | {} |", arm.name, arm.seeds.len());
        for (i, t) in tags().enumerate() {
            let c = cell(arm, t, 1000 + (k * 10 + i) as u64);
            s += &format!(" {} [{}, {}] |", pct(c.mean), pct(c.ci[0]), pct(c.ci[1]));
        }
        s += "\n";
    }
    s += "\nOverall accuracy per training seed:\n\n";
    for (k, arm) in arms.iter().enumerate() {
        let c = cell(arm, None, 1000 + (k * 10 + 6) as u64);
        let v: Vec<String> = c.per_seed.iter().map(|x| pct(*x)).collect();
        s += &format!("- {}: {}\n", arm.name, v.join(", "));
    }
    s += &format!(
        "\n## Against `{}` (points; fixed / broken; McNemar p)\n\n| arm |",
        arms[reference].name
    );
    for t in tags() {
        s += &format!(" {} |", tag_name(t));
    }
    s += "\n|---|";
    for _ in tags() {
        s += "---|";
    }
    s += "\n";
    for (k, arm) in arms.iter().enumerate() {
        if k == reference {
            continue;
        }
        s += &format!("| {} |", arm.name);
        for (i, t) in tags().enumerate() {
            let d = difference(arm, &arms[reference], t, 2000 + (k * 10 + i) as u64);
            s += &format!(
                " {:+.1} [{:+.1}, {:+.1}]; {}/{}; p={:.3} |",
                100.0 * d.mean,
                100.0 * d.ci[0],
                100.0 * d.ci[1],
                d.gained,
                d.lost,
                d.p_value
            );
        }
        s += "\n";
    }
    s += "\n![accuracy per category, 95% intervals](chart.png)\n\n## Settings\n\n";
    for (k, v) in settings {
        s += &format!("- {k}: {v}\n");
    }
    s += "\n## Rerun one arm\n\n```sh\n";
    for c in commands {
        s += &format!("{c}\n");
    }
    s += "```\n\n## Wall time (this invocation; reused results cost nothing)\n\n| part | seconds |\n|---|---:|\n";
    for (k, v) in timings {
        s += &format!("| {k} | {v:.1} |\n");
    }
    s
}

const PALETTE: [Rgb<u8>; 6] = [
    Rgb([90, 90, 90]),
    Rgb([31, 119, 180]),
    Rgb([255, 127, 14]),
    Rgb([44, 160, 44]),
    Rgb([214, 39, 40]),
    Rgb([148, 103, 189]),
];

/// Grouped bars (a group per category, a bar per arm) with 95% interval whiskers.
pub fn chart(arms: &[ArmResults]) -> anyhow::Result<RgbImage> {
    const H: u32 = 260;
    const BAR: u32 = 14;
    const GAP: u32 = 18;
    const LEFT: u32 = 40;
    const TOP: u32 = 16;
    const FONT: f32 = 13.0;
    let groups: Vec<Option<Tag>> = tags().collect();
    // Wide enough for the category names under each group.
    let label_w = groups
        .iter()
        .map(|t| text_width(tag_name(*t), FONT))
        .max()
        .unwrap_or(0);
    let group_w = (arms.len() as u32 * BAR).max(label_w + 4) + GAP;
    let legend_h = 18 * arms.len() as u32 + 8;
    let width = LEFT + groups.len() as u32 * group_w + 20;
    let height = TOP + H + 40 + legend_h;
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let ink = Rgb([20, 20, 20]);
    let y_of = |v: f64| TOP + H - (v.clamp(0.0, 1.0) * f64::from(H)) as u32;
    for tick in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let y = y_of(tick);
        for x in LEFT..width - 10 {
            img.put_pixel(x, y, Rgb([225, 225, 225]));
        }
        draw_text(
            &mut img,
            2,
            y as i32 - 7,
            FONT,
            ink,
            &format!("{:.0}", tick * 100.0),
        );
    }
    for (g, t) in groups.iter().enumerate() {
        let bars = arms.len() as u32 * BAR;
        let x0 = LEFT + g as u32 * group_w + GAP / 2 + (group_w - GAP - bars) / 2;
        for (k, arm) in arms.iter().enumerate() {
            let c = cell(arm, *t, 1000 + (k * 10 + g) as u64);
            if !c.mean.is_finite() {
                continue;
            }
            let x = x0 + k as u32 * BAR;
            for yy in y_of(c.mean)..TOP + H {
                for xx in x..x + BAR - 2 {
                    img.put_pixel(xx, yy, PALETTE[k % PALETTE.len()]);
                }
            }
            if c.ci[0].is_finite() {
                let (lo, hi) = (y_of(c.ci[1]), y_of(c.ci[0]));
                let xm = x + BAR / 2 - 1;
                for yy in lo..=hi {
                    img.put_pixel(xm, yy, ink);
                }
                for xx in xm - 3..=xm + 3 {
                    img.put_pixel(xx, lo, ink);
                    img.put_pixel(xx, hi, ink);
                }
            }
        }
        let name = tag_name(*t);
        let label_x = LEFT
            + g as u32 * group_w
            + GAP / 2
            + (group_w - GAP).saturating_sub(text_width(name, FONT)) / 2;
        draw_text(
            &mut img,
            label_x as i32,
            (TOP + H + 6) as i32,
            FONT,
            ink,
            name,
        );
    }
    draw_text(
        &mut img,
        (LEFT + 200) as i32,
        (TOP + H + 30) as i32,
        FONT,
        ink,
        "accuracy %, 95 % intervals over training seeds and images",
    );
    for (k, arm) in arms.iter().enumerate() {
        let y = TOP + H + 30 + 18 * k as u32;
        for yy in y..y + 12 {
            for xx in LEFT..LEFT + 12 {
                img.put_pixel(xx, yy, PALETTE[k % PALETTE.len()]);
            }
        }
        draw_text(
            &mut img,
            (LEFT + 18) as i32,
            y as i32 - 2,
            FONT,
            ink,
            &arm.name,
        );
    }
    Ok(img)
}
