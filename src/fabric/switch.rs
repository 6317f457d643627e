//! TEMPORARY stub: replaced by the real switch (helper branch `switch`).
#![allow(dead_code, unused_variables)]
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PortSpec {
    pub node: String,
    pub switch_port: u16,
    pub qemu_port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SwitchConfig {
    pub ports: Vec<PortSpec>,
    pub control: PathBuf,
    pub watch: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct LinkFault {
    pub loss: f64,
    pub delay_ms: u64,
    pub duplicate: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    Partition { groups: Vec<Vec<String>> },
    Heal,
    Link { node: String, fault: LinkFault },
    Capture { path: Option<PathBuf> },
    Shutdown,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PortCounters {
    pub node: String,
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_bytes: u64,
    pub dropped_partition: u64,
    pub dropped_loss: u64,
    pub duplicated: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub ports: Vec<PortCounters>,
    pub partition: Option<Vec<Vec<String>>>,
    pub links: BTreeMap<String, LinkFault>,
    pub capture: Option<PathBuf>,
    pub captured_frames: u64,
}

pub fn serve(config: SwitchConfig) -> anyhow::Result<()> {
    todo!()
}

pub fn request(control: &Path, req: &Request, timeout: Duration) -> anyhow::Result<Status> {
    todo!()
}
