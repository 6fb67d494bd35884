use clap::Parser;
use stallmesh_identity::files::{self, DeviceCredentials};
use stallmesh_identity::{DeviceId, DeviceKey, Role};
use stallmesh_node::cli::{run_client, Cli, ClientError, Command, DeviceCmd, MarketCmd, RoleArg};
use stallmesh_node::config::Config;
use stallmesh_node::init_tracing;
use stallmesh_node::runtime::now_ms;
use std::process::ExitCode;

/// mimalloc, not glibc's malloc: the simulator (`stallmesh sim`) holds a thousand replicas of
/// small maps and buffers, and on glibc 12-15% of `stress-1000`'s loop went to the allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}

fn up(args: stallmesh_node::cli::UpArgs) -> Result<(), String> {
    let mut config = Config::load(args.config.as_deref(), |k| std::env::var(k).ok()).map_err(|e| e.to_string())?;
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if let Some(a) = args.http_addr {
        config.http_addr = a.parse().map_err(|e| format!("--http-addr {a:?}: {e}"))?;
    }
    if let Some(c) = args.credentials {
        config.credentials_dir = c;
    }
    if let Some(u) = args.cloud_url {
        config.cloud.url = u;
    }
    init_tracing(config.log_format);
    for name in stallmesh_node::config::unknown_env_vars(std::env::vars().map(|(k, _)| k)) {
        tracing::warn!(variable = %name, "environment variable sets no configuration key (a typo?); ignored");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let running = stallmesh_node::start(&config, shutdown_signal()).await.map_err(|e| e.to_string())?;
        let served = running.server.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string());
        // Changes received from peers are committed without waiting for the disk: flush them now.
        running.node.flush().map_err(|e| e.to_string())?;
        served
    })
}

fn staff(cmd: stallmesh_node::cli::StaffCmd) -> Result<(), String> {
    use stallmesh_node::cli::StaffCmd;
    use stallmesh_node::staff::StaffBook;
    match cmd {
        StaffCmd::Add { name, data_dir } => {
            let mut pin = String::new();
            std::io::stdin().read_line(&mut pin).map_err(|e| format!("reading the PIN from standard input: {e}"))?;
            StaffBook::in_data_dir(&data_dir).set(name.trim(), pin.trim()).map_err(|e| e.to_string())?;
            println!("{} may sign in on the node using {}", name.trim(), data_dir.display());
        }
        StaffCmd::Remove { name, data_dir } => {
            StaffBook::in_data_dir(&data_dir).remove(&name).map_err(|e| e.to_string())?;
            println!("{name} removed (signed-in sessions end when the node restarts or they expire)");
        }
        StaffCmd::List { data_dir } => {
            for name in StaffBook::in_data_dir(&data_dir).names().map_err(|e| e.to_string())? {
                println!("{name}");
            }
        }
    }
    Ok(())
}

fn admin(cmd: Command) -> Result<(), String> {
    match cmd {
        Command::Market(MarketCmd::Init { dir, name }) => {
            let (_, info) = files::init_market(&dir, &name).map_err(|e| e.to_string())?;
            println!("market {:?} created: id {}", info.name, info.market_id);
            println!("secret key: {} (mode 0600; keep it off the tablets)", dir.join(files::MARKET_KEY_FILE).display());
        }
        Command::Device(DeviceCmd::Enroll { market, stall, role, valid_days, out }) => {
            let (market_key, info) = files::load_market(&market).map_err(|e| e.to_string())?;
            let key = DeviceKey::generate().map_err(|e| e.to_string())?;
            let role = match role {
                RoleArg::Seller => Role::Seller,
                RoleArg::Organiser => Role::Organiser,
                RoleArg::Cloud => Role::Cloud,
                RoleArg::Online => Role::Online,
            };
            let expires = now_ms().saturating_add(valid_days.saturating_mul(24 * 3_600_000));
            let certificate = market_key.enrol(key.device_id(), &stall, role, expires);
            let device = key.device_id();
            files::write_device(&out, &DeviceCredentials { key, certificate, market: info, mesh_psk: market_key.mesh_psk() })
                .map_err(|e| e.to_string())?;
            println!("device {device} enrolled for stall {stall:?}");
            println!("start it with: stallmesh up --credentials {}", out.display());
        }
        Command::Device(DeviceCmd::Revoke { market, device, out }) => {
            let (market_key, _) = files::load_market(&market).map_err(|e| e.to_string())?;
            let device = DeviceId::from_hex(&device).map_err(|e| format!("--device: {e}"))?;
            let rev = market_key.revoke(device, now_ms());
            files::write_revocation(&out, &rev).map_err(|e| e.to_string())?;
            println!("revocation of {device} written to {}; hand it to any node: stallmesh revoke {}", out.display(), out.display());
        }
        _ => unreachable!("not an admin verb"),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => up(args),
        Command::Sim(args) => {
            return match stallmesh_node::sim_cli::run_sim(args) {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Cloud(cmd) => stallmesh_node::cloud_cli::run(cmd, shutdown_signal()),
        cmd @ (Command::Market(_) | Command::Device(_)) => admin(cmd),
        Command::Staff(cmd) => staff(cmd),
        cmd => match run_client(cmd) {
            Ok(()) => Ok(()),
            // The node's refusal, already in sentences ("Refused: ..."): no "error:" in front of it.
            Err(e @ ClientError::Api { .. }) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
            Err(e) => Err(e.to_string()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
