//! Precision and device choices as they appear in recipes and on the command line.
use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use crate::{Error, Result};

/// Storage precision of frozen weights. Trainable parameters and optimizer state are always fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    #[default]
    F32,
    Bf16,
    F16,
}

impl DType {
    pub fn kind(self) -> Kind {
        match self {
            DType::F32 => Kind::Float,
            DType::Bf16 => Kind::BFloat16,
            DType::F16 => Kind::Half,
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::Bf16),
            "f16" | "fp16" | "float16" => Ok(DType::F16),
            other => Err(Error::invalid(format!(
                "unknown dtype `{other}` (expected f32, bf16 or f16)"
            ))),
        }
    }
}

/// `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(DeviceSpec::Cuda(i)),
                _ => Err(Error::invalid(format!(
                    "unknown device `{s}` (expected cpu, cuda, cuda:N or auto)"
                ))),
            },
        }
    }
    /// Resolves to a tch device; asking for CUDA where none is usable is an error, never a
    /// silent fall-back to the CPU.
    pub fn resolve(&self) -> Result<Device> {
        match self {
            DeviceSpec::Auto => Ok(Device::cuda_if_available()),
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(i) => {
                let n = tch::Cuda::device_count() as usize;
                if *i < n {
                    Ok(Device::Cuda(*i))
                } else {
                    Err(Error::invalid(format!(
                        "device cuda:{i} requested but {n} CUDA device(s) are usable by this build"
                    )))
                }
            }
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        DeviceSpec::parse(&s)
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        match d {
            DeviceSpec::Auto => "auto".into(),
            DeviceSpec::Cpu => "cpu".into(),
            DeviceSpec::Cuda(i) => format!("cuda:{i}"),
        }
    }
}
