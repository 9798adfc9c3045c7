//! The one place that decides where the encoder runs.

use candle_core::Device;

/// Where the user asked the encoder to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The CPU.
    Cpu,
    /// The first CUDA GPU; falls back to the CPU with a warning when there is none or the
    /// binary was built without the `cuda` feature.
    Cuda,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            other => Err(format!("unknown device '{other}' (expected cpu or cuda)")),
        }
    }
}

/// The device for `choice`.
pub fn select(choice: DeviceChoice) -> Device {
    match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda => cuda_or_cpu(),
    }
}

#[cfg(feature = "cuda")]
fn cuda_or_cpu() -> Device {
    match Device::new_cuda(0) {
        Ok(device) => device,
        Err(e) => {
            tracing::warn!(error = %e, "no usable CUDA GPU; running on the CPU");
            Device::Cpu
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_or_cpu() -> Device {
    tracing::warn!("this binary was built without the `cuda` feature; running on the CPU");
    Device::Cpu
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_cpu_and_cuda_falls_back_without_a_gpu() {
        assert!(select(DeviceChoice::Cpu).is_cpu());
        #[cfg(not(feature = "cuda"))]
        assert!(select(DeviceChoice::Cuda).is_cpu());
        assert_eq!("cuda".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda));
        assert!("tpu".parse::<DeviceChoice>().is_err());
    }
}
