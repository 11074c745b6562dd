use softalign_core::catalogue::{self, PluginKind};

#[derive(clap::Args)]
pub struct Args {
    /// Also print each plugin's example TOML snippet.
    #[arg(long)]
    pub examples: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    for kind in PluginKind::ALL {
        let entries: Vec<_> = catalogue::entries()
            .into_iter()
            .filter(|e| e.kind == kind)
            .collect();
        println!("{} ({}):", kind.table(), entries.len());
        for e in entries {
            println!("  {:<24} {}", e.name, e.summary);
            if args.examples {
                for line in e.example.lines() {
                    println!("      {line}");
                }
            }
        }
        println!();
    }
    Ok(())
}
