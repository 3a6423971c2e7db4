//! Counters the relay keeps per direction, so a run can report what the link did to its traffic.

use serde::{Deserialize, Serialize};

use crate::link::DropReason;

/// Packets and their UDP payload bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

impl Counter {
    pub fn add(&mut self, len: usize) {
        self.packets += 1;
        self.bytes += len as u64;
    }
}

/// Dropped packets, by [`DropReason`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCounts {
    pub queue_full: Counter,
    pub loss: Counter,
    pub overflow: Counter,
    pub send_failed: Counter,
}

impl DropCounts {
    pub fn get(&self, reason: DropReason) -> Counter {
        match reason {
            DropReason::QueueFull => self.queue_full,
            DropReason::Loss => self.loss,
            DropReason::Overflow => self.overflow,
            DropReason::SendFailed => self.send_failed,
        }
    }

    pub fn get_mut(&mut self, reason: DropReason) -> &mut Counter {
        match reason {
            DropReason::QueueFull => &mut self.queue_full,
            DropReason::Loss => &mut self.loss,
            DropReason::Overflow => &mut self.overflow,
            DropReason::SendFailed => &mut self.send_failed,
        }
    }

    pub fn total(&self) -> Counter {
        [self.queue_full, self.loss, self.overflow, self.send_failed]
            .iter()
            .fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            })
    }
}

/// One direction's traffic: every offered packet is eventually delivered or dropped; until
/// then it is in flight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionStats {
    pub offered: Counter,
    pub delivered: Counter,
    pub dropped: DropCounts,
}

impl DirectionStats {
    /// Packets offered but neither delivered nor dropped yet (waiting in the emulated link).
    pub fn in_flight_packets(&self) -> u64 {
        self.offered
            .packets
            .saturating_sub(self.delivered.packets + self.dropped.total().packets)
    }
}

/// A snapshot of the relay's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmulatorStats {
    /// Client → server.
    pub uplink: DirectionStats,
    /// Server → client.
    pub downlink: DirectionStats,
    /// Client addresses seen so far (each gets its own upstream socket).
    pub sessions_opened: u64,
    /// Sessions currently open (closed after `RelayOptions::session_idle_timeout` of silence).
    pub sessions_active: u64,
}
