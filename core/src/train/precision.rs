//! The precision policy: frozen weights in the recipe's `weights_dtype`, trainable parameters
//! and optimizer state always fp32; and full-parameter mode, where the backbone's own weights
//! become the trainable parameters.
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use super::glob::glob_match;
use crate::dtype::DType;
use crate::{Error, Result};

fn is_float(k: Kind) -> bool {
    matches!(k, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
}

/// Freezes every variable of a backbone and stores its floating-point weights in `dtype`
/// (integer buffers are left alone). For adapter training: the backbone only carries
/// gradients through, it never receives them.
pub fn freeze_in_dtype(vs: &mut VarStore, dtype: DType) {
    vs.freeze();
    // These convert floating-point variables only; `set_kind` would convert integer buffers
    // too.
    match dtype {
        DType::F32 => vs.float(),
        DType::Bf16 => vs.bfloat16(),
        DType::F16 => vs.half(),
    }
}

/// Checks the trainer's invariant on trainable parameters: fp32 leaves that require grad.
pub fn check_trainable(params: &[(String, Tensor)]) -> Result<()> {
    if params.is_empty() {
        return Err(Error::invalid(
            "the task has no trainable parameters (check the recipe's adapters)",
        ));
    }
    for (name, p) in params {
        if p.kind() != Kind::Float {
            return Err(Error::tensor(
                name,
                format!(
                    "trainable parameters must be fp32 (optimizer state is fp32), this one is \
                     {:?}; only frozen weights follow train.weights_dtype",
                    p.kind()
                ),
            ));
        }
        if !p.requires_grad() {
            return Err(Error::tensor(
                name,
                "trainable parameter does not require grad",
            ));
        }
        if !p.is_leaf() {
            return Err(Error::tensor(
                name,
                "trainable parameter is not a leaf tensor (it was computed from another one)",
            ));
        }
    }
    Ok(())
}

/// Full-parameter mode: every floating-point variable of `vs` becomes trainable and is
/// returned, sorted by name. The backbone must be held in fp32: AdamW updates of bf16/fp16
/// weights lose most of their precision, so a lower `weights_dtype` is refused.
/// The backbone weights full-mode training updates: every trainable fp32 variable whose name
/// no glob in `frozen` matches. A glob that matches no trainable weight is an error (a typo
/// would otherwise train everything).
pub fn full_parameters(
    vs: &VarStore,
    weights_dtype: DType,
    frozen: &[String],
) -> Result<Vec<(String, Tensor)>> {
    if weights_dtype != DType::F32 {
        return Err(Error::Recipe(format!(
            "train.mode = \"full\" trains the backbone's own weights, which must be fp32: set \
             train.weights_dtype = \"f32\" (got {weights_dtype:?})"
        )));
    }
    // Buffers created with `zeros_no_train` & co. (SD3's positional table) are variables too,
    // but not trainable ones: keep only what the model declared trainable.
    let trainable: std::collections::HashSet<usize> = vs
        .trainable_variables()
        .iter()
        .map(|t| t.data_ptr() as usize)
        .collect();
    let mut out: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| is_float(t.kind()) && trainable.contains(&(t.data_ptr() as usize)))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    for glob in frozen {
        if !out.iter().any(|(n, _)| glob_match(glob, n)) {
            return Err(Error::Recipe(format!(
                "train.frozen: `{glob}` matches no trainable backbone weight (names look like \
                 `{}`)",
                out.first().map(|(n, _)| n.as_str()).unwrap_or("")
            )));
        }
    }
    out.retain(|(n, _)| !frozen.iter().any(|g| glob_match(g, n)));
    if out.is_empty() {
        return Err(Error::Recipe(
            "train.frozen leaves no backbone weight to train".into(),
        ));
    }
    for (name, t) in &mut out {
        if t.kind() != Kind::Float {
            return Err(Error::tensor(
                name.as_str(),
                format!(
                    "full-parameter training needs fp32 backbone weights, this one is {:?}",
                    t.kind()
                ),
            ));
        }
        let _ = t.requires_grad_(true);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn;

    fn small_store() -> VarStore {
        let vs = VarStore::new(tch::Device::Cpu);
        let _l = nn::linear(vs.root() / "proj", 3, 2, Default::default());
        vs
    }

    #[test]
    fn frozen_weights_take_the_dtype_and_stop_requiring_grad() {
        let mut vs = small_store();
        freeze_in_dtype(&mut vs, DType::Bf16);
        for (n, t) in vs.variables() {
            assert_eq!(t.kind(), Kind::BFloat16, "{n}");
            assert!(!t.requires_grad(), "{n}");
        }
    }

    #[test]
    fn full_mode_trains_fp32_weights_and_refuses_others() {
        let mut vs = small_store();
        vs.freeze();
        let params = full_parameters(&vs, DType::F32, &[]).unwrap();
        let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["proj.bias", "proj.weight"]);
        let params = full_parameters(&vs, DType::F32, &["*.bias".into()]).unwrap();
        let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["proj.weight"]);
        let err = full_parameters(&vs, DType::F32, &["text_encoder.*".into()]).unwrap_err();
        assert!(
            err.to_string().contains("`text_encoder.*` matches no"),
            "{err}"
        );
        let err = full_parameters(&vs, DType::F32, &["*".into()]).unwrap_err();
        assert!(err.to_string().contains("no backbone weight"), "{err}");
        check_trainable(&params).unwrap();
        let err = full_parameters(&vs, DType::Bf16, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("weights_dtype"), "{err}");
        vs.set_kind(Kind::Half);
        let err = full_parameters(&vs, DType::F32, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("proj.") && err.contains("fp32"), "{err}");
    }

    #[test]
    fn half_trainable_parameters_are_refused_by_name() {
        let t = Tensor::zeros([2], (Kind::Half, tch::Device::Cpu)).set_requires_grad(true);
        let err = check_trainable(&[("tok".into(), t)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`tok`") && err.contains("fp32"), "{err}");
    }
}
