//! Where a model's weights live and its forward passes run: the CPU or a CUDA GPU.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// Where the weights live and the forward passes run. Written `cpu`, `cuda` (GPU 0) or
/// `cuda:N`, in flags and config files alike.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Device {
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal; only in builds with the `cuda` feature.
    #[cfg(feature = "cuda")]
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = ModelError;

    /// A build without the `cuda` feature refuses `cuda` by name, so that a server asked for
    /// a GPU says so at start instead of quietly running on the CPU.
    fn from_str(s: &str) -> Result<Self, ModelError> {
        let ordinal = match s {
            "cpu" => return Ok(Device::Cpu),
            "cuda" => Some(0),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => Some(n.parse::<usize>().map_err(|_| {
                    ModelError::Device(format!("{s:?}: the GPU ordinal must be a number"))
                })?),
                None => None,
            },
        };
        match ordinal {
            None => Err(ModelError::Device(format!(
                "{s:?}: expected cpu, cuda or cuda:N"
            ))),
            #[cfg(feature = "cuda")]
            Some(i) => Ok(Device::Cuda(i)),
            #[cfg(not(feature = "cuda"))]
            Some(_) => Err(ModelError::Device(format!(
                "{s:?}: this build has no CUDA support (build with the `cuda` feature: \
                 cargo xtask cuda)"
            ))),
        }
    }
}

impl TryFrom<String> for Device {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, ModelError> {
        s.parse()
    }
}

impl From<Device> for String {
    fn from(d: Device) -> String {
        d.to_string()
    }
}

impl Device {
    pub(crate) fn to_candle(self) -> Result<candle_core::Device, ModelError> {
        match self {
            Device::Cpu => Ok(candle_core::Device::Cpu),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => candle_core::Device::new_cuda(i)
                .map_err(|e| ModelError::Device(format!("CUDA device {i}: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Device;

    #[test]
    fn a_device_is_written_as_it_is_read() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!(Device::Cpu.to_string(), "cpu");
        for bad in ["", "gpu", "cuda:", "cuda:x", "CPU"] {
            assert!(bad.parse::<Device>().is_err(), "{bad:?} was accepted");
        }
        #[cfg(feature = "cuda")]
        {
            assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
            assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
            assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        }
        #[cfg(not(feature = "cuda"))]
        for gpu in ["cuda", "cuda:1"] {
            let e = gpu.parse::<Device>().unwrap_err().to_string();
            assert!(e.contains("no CUDA support"), "{gpu:?}: {e}");
        }
    }
}
