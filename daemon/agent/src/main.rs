//! mistnetd: the mistnet node agent (I/O shell).

fn main() -> anyhow::Result<()> {
    anyhow::bail!("mistnetd is not built yet")
}
