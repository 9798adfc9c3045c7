//! The request context as small integer buckets the encoder embeds.
//!
//! Hour of day: 24 buckets plus "unknown". Device: a fixed set of common classes plus
//! "other" and "unknown", so the vocabulary never grows with what clients send.

use serde::{Deserialize, Serialize};

/// Hour buckets: 0 = unknown, 1..=24 = hour 0..=23.
pub const HOUR_BUCKETS: usize = 25;
/// Device buckets: 0 = unknown, then [`DEVICES`], then "other".
pub const DEVICE_BUCKETS: usize = DEVICES.len() + 2;
/// Device classes with a bucket of their own.
pub const DEVICES: [&str; 4] = ["mobile", "desktop", "tablet", "app"];

/// A context as bucket indices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContextIds {
    /// Hour bucket.
    pub hour: u8,
    /// Device bucket.
    pub device: u8,
}

impl ContextIds {
    /// Buckets for an hour (0..=23) and a device class, either unknown.
    pub fn from_parts(hour: Option<u8>, device: Option<&str>) -> Self {
        let hour = hour.filter(|h| *h < 24).map_or(0, |h| h + 1);
        let device = match device {
            None => 0,
            Some(d) => DEVICES
                .iter()
                .position(|known| known.eq_ignore_ascii_case(d.trim()))
                .map_or(DEVICE_BUCKETS - 1, |i| i + 1),
        };
        Self {
            hour,
            device: device as u8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets() {
        assert_eq!(
            ContextIds::from_parts(None, None),
            ContextIds { hour: 0, device: 0 }
        );
        assert_eq!(
            ContextIds::from_parts(Some(23), Some("Mobile")),
            ContextIds {
                hour: 24,
                device: 1
            }
        );
        assert_eq!(
            ContextIds::from_parts(Some(24), Some("fridge")).device as usize,
            DEVICE_BUCKETS - 1
        );
        assert_eq!(ContextIds::from_parts(Some(24), None).hour, 0);
    }
}
