//! `softalign bench --recipe R`: what one training step of a recipe costs, and each of its
//! objectives alone (forward and backward into the trainable tensors, on one batch of the
//! recipe's own data), so the price of a term (the counting term's decode and detector) reads
//! as the difference between rows. The gradient norm each case leaves in the trainable
//! tensors (objective weights applied) shows how the terms' weights balance.
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use softalign_objectives::{evaluate, StepInputs, StepOptions};
use tch::Tensor;

use super::build::Built;

fn shallow(inputs: &StepInputs) -> StepInputs {
    StepInputs {
        x0: inputs.x0.shallow_clone(),
        cond: inputs.cond.shallow_clone(),
        noise: inputs.noise.shallow_clone(),
        timestep: inputs.timestep.shallow_clone(),
        captions: inputs.captions.clone(),
        preference_pairs: inputs.preference_pairs,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(recipe: &Path, sets: &[String], iters: usize, warmup: usize) -> anyhow::Result<()> {
    anyhow::ensure!(iters > 0, "--iters must be at least 1");
    let built = Built::for_training(recipe, sets)?;
    let task = built.into_task()?;
    let params: Vec<Tensor> = softalign_core::train::TrainTask::parameters(&task)
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    let inputs = task.draw_inputs().context("drawing a batch")?;
    let opts = StepOptions {
        pairs_per_forward: task.config.pairs_per_forward,
        backward: Some(1.0),
    };
    let adapters = (!task.adapters.is_empty()).then_some(task.adapters.as_slice());
    let n = task.objectives.len();
    let mut cases: Vec<(String, std::ops::Range<usize>)> = vec![("all objectives".into(), 0..n)];
    if n > 1 {
        for (k, o) in task.objectives.iter().enumerate() {
            cases.push((format!("{} alone", o.name()), k..k + 1));
        }
    }
    let t: Vec<f64> =
        Vec::<f64>::try_from(inputs.timestep.to_kind(tch::Kind::Double).flatten(0, -1))?;
    println!(
        "recipe {}: {} images per step, {} objectives, {} trainable tensors, timestep(s) {:?} \
         (a term gated by timestep, as counting by max_timestep, may be skipped in this draw)",
        recipe.display(),
        task.config.images_per_step,
        n,
        params.len(),
        t
    );
    println!(
        "{:<38} {:>12} {:>10} {:>12} {:>12}",
        "case (forward + backward)", "ms/step", "forwards", "grad norm", "loss"
    );
    let mut times = vec![Vec::new(); cases.len()];
    let mut forwards = vec![0; cases.len()];
    let mut norms = vec![0.0; cases.len()];
    let mut losses = vec![0.0; cases.len()];
    // Round-robin, as the model bench runs its cases, so drift in a shared CPU hits all alike.
    for it in 0..warmup + iters {
        for (c, (_, range)) in cases.iter().enumerate() {
            for p in &params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let t = Instant::now();
            let r = evaluate(
                task.backbone.as_ref(),
                adapters,
                &task.objectives[range.clone()],
                shallow(&inputs),
                &opts,
            )?;
            if it >= warmup {
                times[c].push(t.elapsed().as_secs_f64() * 1e3);
            }
            forwards[c] = r.forwards;
            losses[c] = r.total;
            norms[c] = grad_norm(&params);
        }
    }
    for (c, (name, _)) in cases.iter().enumerate() {
        println!(
            "{:<38} {:>12.1} {:>10} {:>12.4e} {:>12.4e}",
            name,
            median(times[c].clone()),
            forwards[c],
            norms[c],
            losses[c]
        );
    }
    Ok(())
}

/// The global L2 norm of the trainable tensors' gradients.
fn grad_norm(params: &[Tensor]) -> f64 {
    params
        .iter()
        .map(|p| p.grad())
        .filter(|g| g.defined())
        .map(|g| g.square().sum(tch::Kind::Double).double_value(&[]))
        .sum::<f64>()
        .sqrt()
}
