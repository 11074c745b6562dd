//! The shapes world's exact scorer as a reward: 1 when the image satisfies its prompt by
//! GenEval's rules (what the world's evaluation counts as correct), else 0. The image is
//! quantised to 8 bits first, exactly as a saved sample, so the reward equals what `softalign
//! eval` would judge the PNG. Binary, not partial credit per clause: it is the evaluation's
//! own measure, and nothing here shows partial credit trains better.
use serde::{Deserialize, Serialize};
use softalign_core::plugin::{BuildContext, RewardSpec};
use softalign_core::reward::{Reward, RewardPrompt};
use softalign_core::{register_plugin, Error, Result};
use softalign_worlds::geneval::EvalPrompt;
use softalign_worlds::shapes::scorer::{score_image_with, ScorerConfig};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapesScorerSpec {}

register_plugin!(
    SHAPES_SCORER_ENTRY,
    Reward,
    "shapes_scorer",
    "The shapes world's exact GenEval scorer: 1 when the image satisfies its prompt, else 0",
    r#"[reward]
type = "shapes_scorer"
"#
);

#[typetag::serde(name = "shapes_scorer")]
impl RewardSpec for ShapesScorerSpec {
    fn validate(&self, _ctx: &BuildContext) -> Result<()> {
        Ok(())
    }
    fn build(&self, _ctx: &BuildContext) -> Result<Box<dyn Reward>> {
        Ok(Box::new(ShapesScorer {
            config: ScorerConfig::default(),
        }))
    }
}

pub struct ShapesScorer {
    config: ScorerConfig,
}

impl Reward for ShapesScorer {
    fn name(&self) -> &str {
        "shapes_scorer"
    }

    fn score(&self, images: &Tensor, prompts: &[RewardPrompt]) -> Result<Vec<f64>> {
        let size = images.size();
        let &[b, 3, h, w] = size.as_slice() else {
            return Err(Error::tensor(
                "images",
                format!("shape {size:?}, expected (B, 3, H, W) RGB in [-1, 1]"),
            ));
        };
        if prompts.len() as i64 != b {
            return Err(Error::invalid(format!(
                "reward shapes_scorer: {} prompts for {b} images",
                prompts.len()
            )));
        }
        let x = images
            .detach()
            .to_kind(Kind::Float)
            .to_device(Device::Cpu)
            .contiguous();
        let mut out = Vec::with_capacity(prompts.len());
        for (i, p) in prompts.iter().enumerate() {
            let meta = p.metadata.clone().ok_or_else(|| {
                Error::invalid(format!(
                    "reward shapes_scorer: prompt `{}` has no GenEval metadata; the scorer \
                     judges tag / include / exclude, not the text",
                    p.text
                ))
            })?;
            let prompt: EvalPrompt = serde_json::from_value(meta).map_err(|e| {
                Error::invalid(format!(
                    "reward shapes_scorer: prompt `{}`: bad GenEval metadata: {e}",
                    p.text
                ))
            })?;
            let data = Vec::<f32>::try_from(x.get(i as i64).flatten(0, -1))?;
            let img = softalign_worlds::shapes::from_signed_chw(&data, w as u32, h as u32)
                .ok_or_else(|| Error::tensor("images", "not an RGB image of its shape"))?;
            let judgement = score_image_with(&img, &prompt, &self.config);
            out.push(if judgement.correct { 1.0 } else { 0.0 });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use softalign_worlds::shapes::SceneConfig;
    use softalign_worlds::shapes::{eval_prompts, render, scene_for_prompt, to_signed_chw};

    /// The oracle scene of a prompt scores 1 against it; a blank image scores 0; a prompt
    /// without metadata is an error naming it.
    #[test]
    fn the_scene_of_a_prompt_is_rewarded_and_a_blank_image_is_not() {
        let p = eval_prompts(0).into_iter().next().unwrap();
        let rp = RewardPrompt {
            text: p.prompt.clone(),
            metadata: Some(serde_json::to_value(&p).unwrap()),
        };
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(3);
        let scene = scene_for_prompt(&mut rng, &p, &SceneConfig::default(), 0).unwrap();
        let img = Tensor::from_slice(&to_signed_chw(&render(&scene, 32))).reshape([1, 3, 32, 32]);
        let blank = Tensor::ones([1, 3, 32, 32], (Kind::Float, Device::Cpu));
        let r = ShapesScorerSpec::default()
            .build(&BuildContext::cpu("."))
            .unwrap();
        let both = Tensor::cat(&[img, blank.shallow_clone()], 0);
        assert_eq!(
            r.score(&both, &[rp.clone(), rp.clone()]).unwrap(),
            [1.0, 0.0]
        );
        let no_meta = RewardPrompt {
            metadata: None,
            ..rp
        };
        let e = r.score(&blank, &[no_meta]).unwrap_err().to_string();
        assert!(
            e.contains("no GenEval metadata") && e.contains(&p.prompt),
            "{e}"
        );
    }
}
