//! The guest agent: the guest side of the driver's control channel on the
//! virtio-serial port org.photon.agent (src/agent/).
fn main() {
    photon_cluster::agent::main();
}
