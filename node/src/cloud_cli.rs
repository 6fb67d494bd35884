//! `stallmesh cloud …`: run the cloud ingest, register a market with it, follow a market's log.

use crate::cli::{CloudCmd, CloudMarketCmd, CloudUpArgs};
use crate::config::Config;
use stallmesh_api::cloud::{CloudErrorBody, MarketRegistered, RegisterMarket};
use stallmesh_identity::files;
use std::io::Write;
use std::time::Duration;

/// How long one `cloud tail --follow` request waits for new events (below the cloud's maximum).
const TAIL_WAIT_MS: u64 = 20_000;
/// Events asked for per request.
const TAIL_LIMIT: usize = 1_000;
/// Pause before asking again after a failed request while following.
const TAIL_RETRY_MS: u64 = 1_000;

pub fn run(cmd: CloudCmd, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<(), String> {
    match cmd {
        CloudCmd::Up(args) => up(args, shutdown),
        CloudCmd::Market(CloudMarketCmd::Add(a)) => add_market(&a.dir, &a.cloud, a.token, &a.data_dir),
        CloudCmd::Market(CloudMarketCmd::Online(a)) => set_online(&a.dir, &a.cloud, a.token, &a.data_dir),
        CloudCmd::Tail { market, after, follow, cloud } => tail(&market, after, follow, &cloud),
    }
}

fn up(args: CloudUpArgs, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<(), String> {
    let config = Config::load(args.config.as_deref(), |k| std::env::var(k).ok()).map_err(|e| e.to_string())?;
    let mut c = config.cloud_service;
    if let Some(l) = args.listen {
        c.listen = l.parse().map_err(|e| format!("--listen {l:?}: {e}"))?;
    }
    if let Some(d) = args.data_dir {
        c.data_dir = d;
    }
    if let Some(u) = args.postgres_url {
        c.postgres_url = u;
    }
    if let Some(u) = args.nats_url {
        c.nats_url = u;
    }
    crate::init_tracing(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let running = stallmesh_cloud::start(&c, shutdown).await.map_err(|e| e.to_string())?;
        tracing::info!(
            "point tablets at it with cloud.url = \"http://{}\"; register a market with `stallmesh cloud market add DIR --data-dir {}`",
            running.addr,
            c.data_dir.display()
        );
        running.server.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
    })
}

fn admin_token(token: Option<String>, data_dir: &std::path::Path) -> Result<String, String> {
    match token {
        Some(t) => Ok(t),
        None => {
            let path = data_dir.join(stallmesh_cloud::ADMIN_TOKEN_FILE);
            Ok(std::fs::read_to_string(&path)
                .map_err(|e| format!("{}: {e} (pass --token, or --data-dir of the running cloud)", path.display()))?
                .trim()
                .to_string())
        }
    }
}

fn refused(url: &str, e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, r) => {
            let b: Option<CloudErrorBody> = r.into_json().ok();
            b.map_or_else(|| format!("{url}: HTTP {code}"), |b| format!("the cloud refused ({code} {}): {}", b.error, b.message))
        }
        e => format!("{url}: {e}"),
    }
}

fn set_online(dir: &std::path::Path, cloud: &str, token: Option<String>, data_dir: &std::path::Path) -> Result<(), String> {
    let creds = files::load_device(dir).map_err(|e| e.to_string())?;
    let token = admin_token(token, data_dir)?;
    let body = stallmesh_api::cloud::SetOnlineChannel {
        certificate: hex::encode(postcard::to_allocvec(&creds.certificate).expect("certificates serialize")),
        device_key: hex::encode(creds.key.secret()),
    };
    let url = format!("{}/v1/markets/{}/online", cloud.trim_end_matches('/'), creds.market.market_id.to_hex());
    let r = ureq::put(&url).set("authorization", &format!("Bearer {token}")).send_json(&body).map_err(|e| refused(&url, e))?;
    let done: stallmesh_api::cloud::OnlineChannelSet = r.into_json().map_err(|e| format!("{url}: {e}"))?;
    let verb = if done.created { "is set up" } else { "was already set up" };
    println!("the online channel of market {:?} {verb}: device {} (give it a share when you plan a drop)", creds.market.name, done.online_device);
    Ok(())
}

fn add_market(dir: &std::path::Path, cloud: &str, token: Option<String>, data_dir: &std::path::Path) -> Result<(), String> {
    let creds = files::load_device(dir).map_err(|e| e.to_string())?;
    let token = admin_token(token, data_dir)?;
    let body = RegisterMarket {
        name: creds.market.name.clone(),
        market_public_key: creds.market.public_key.to_hex(),
        certificate: hex::encode(postcard::to_allocvec(&creds.certificate).expect("certificates serialize")),
        device_key: hex::encode(creds.key.secret()),
    };
    let url = format!("{}/v1/markets", cloud.trim_end_matches('/'));
    let response = ureq::post(&url).set("authorization", &format!("Bearer {token}")).send_json(&body);
    match response {
        Ok(r) => {
            let done: MarketRegistered = r.into_json().map_err(|e| format!("{url}: {e}"))?;
            let verb = if done.created { "registered" } else { "was already registered" };
            println!("market {:?} ({}) {verb}; the cloud's device is {}", creds.market.name, done.market, done.cloud_device);
            Ok(())
        }
        Err(ureq::Error::Status(code, r)) => {
            let b: Option<CloudErrorBody> = r.into_json().ok();
            Err(b.map_or_else(|| format!("{url}: HTTP {code}"), |b| format!("the cloud refused ({code} {}): {}", b.error, b.message)))
        }
        Err(e) => Err(format!("{url}: {e}")),
    }
}

fn tail(market: &str, mut after: u64, follow: bool, cloud: &str) -> Result<(), String> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_millis(TAIL_WAIT_MS + 10_000)).build();
    let out = std::io::stdout();
    loop {
        let wait = if follow { TAIL_WAIT_MS } else { 0 };
        let url = format!("{}/v1/markets/{market}/events", cloud.trim_end_matches('/'));
        let response = agent
            .get(&url)
            .query("after", &after.to_string())
            .query("limit", &TAIL_LIMIT.to_string())
            .query("wait_ms", &wait.to_string())
            .call();
        let text = match response {
            Ok(r) => r.into_string().map_err(|e| format!("{url}: {e}"))?,
            Err(ureq::Error::Status(code, r)) => {
                let b: Option<CloudErrorBody> = r.into_json().ok();
                return Err(b.map_or_else(|| format!("{url}: HTTP {code}"), |b| format!("{} ({code}): {}", b.error, b.message)));
            }
            Err(e) if follow => {
                eprintln!("{url}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(TAIL_RETRY_MS));
                continue;
            }
            Err(e) => return Err(format!("{url}: {e}")),
        };
        let mut lock = out.lock();
        let mut got = 0;
        for line in text.lines().filter(|l| !l.is_empty()) {
            let event: stallmesh_api::cloud::LogEvent = serde_json::from_str(line).map_err(|e| format!("{url}: {e}"))?;
            after = event.offset;
            got += 1;
            writeln!(lock, "{line}").map_err(|e| e.to_string())?;
        }
        lock.flush().map_err(|e| e.to_string())?;
        if !follow && got < TAIL_LIMIT {
            return Ok(());
        }
    }
}
