//! netbench: link testing and link emulation.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("netbench is not built yet")
}
