//! The `minipacs` command line: `serve`, `send`, `echo`, `dump`,
//! `index rebuild`, `config check` and `update apply`/`verify`. Option names follow dcmtk's long names where dcmtk has one.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use dimse::scu::ScuOptions;
use minipacs::ca;
use minipacs::config::{self, Config};
use minipacs::logs;
use minipacs::privsep;
use minipacs::send::{self, ClientTls, Peer};
use minipacs::service;
use minipacs::store::Layout;
use minipacs::tls::{self, CipherPreference, ClientTlsFiles, PeerCertPolicy};

#[derive(Parser)]
#[command(
    name = "minipacs",
    version,
    about = "A bedside mini PACS: DICOM C-STORE receiver and sender"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Receive objects (C-STORE SCP) and answer C-ECHO.
    Serve(ServeArgs),
    /// Send DICOM files and folders (C-STORE SCU), like storescu.
    Send(SendArgs),
    /// Verify a peer (C-ECHO SCU), like echoscu.
    Echo(EchoArgs),
    /// Parse DICOM files with dicom-object and print their meta group.
    Dump {
        /// files to parse
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// The index of what the store holds.
    Index {
        #[command(subcommand)]
        command: IndexCommand,
    },
    /// The forwarding queue: what waits to go to which destination, what
    /// failed for good; retry or forget entries (while serving, too).
    Queue {
        #[command(flatten)]
        store: IndexArgs,
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Field logs.
    Logs {
        #[command(subcommand)]
        command: LogsCommand,
    },
    /// A private certificate authority for DICOM nodes (replaces dcmtk_ca.pl).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// The device's own settings ([time], [network]), applied as root by
    /// the image's minipacs-system.service.
    System {
        #[command(subcommand)]
        command: SystemCommand,
    },
    /// The image's write window on its read-only boot partition: one
    /// connection on standard input (minipacs-bootfs@.service).
    #[command(hide = true)]
    BootfsWindow {
        /// the boot partition's mount point
        #[arg(long, default_value = "/boot/firmware")]
        mount: PathBuf,
        /// the drop folder on it, opened for the service
        #[arg(long, default_value = "/boot/firmware/minipacs")]
        folder: PathBuf,
        /// the lock that windows share
        #[arg(long, default_value = "/run/minipacs-bootfs.lock")]
        lock: PathBuf,
        /// seconds a window stays open at most
        #[arg(long, default_value_t = 120)]
        hold: u64,
    },
    /// Software updates: signed minipacs packages dropped on the device.
    Update {
        #[command(subcommand)]
        command: UpdateCommand,
    },
}

#[derive(Subcommand)]
enum SystemCommand {
    /// Write the NTP servers, the network and the host name the
    /// configuration asks for, restart what reads them, and roll a network
    /// change back when it leaves the device without a link.
    Apply {
        /// the configuration file (the last-good one)
        #[arg(long, short = 'c', default_value = "/etc/minipacs/minipacs.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum UpdateCommand {
    /// Install the signed, newer minipacs packages in the drop folder, check
    /// the restarted service's health, and reinstall the previous package
    /// if it fails; results beside each drop. Run as root, outside the
    /// service (the image's minipacs-update.service does).
    Apply(UpdateArgs),
    /// Check a package's signature (PACKAGE.minisig beside it) with an
    /// update key, as the device will.
    Verify {
        /// the package (.deb)
        package: PathBuf,
        /// the update key (minisign public key)
        #[arg(long, default_value = minipacs::update::KEY_FILE)]
        key: PathBuf,
    },
}

#[derive(Args)]
struct UpdateArgs {
    /// The service's configuration (its port, AE title, store, logs and drop folder).
    #[arg(long, short = 'c', default_value = "/etc/minipacs/minipacs.toml")]
    config: PathBuf,
    /// The drop folder [default: the configuration's drop_directory].
    #[arg(long = "drop", value_name = "DIR")]
    drop_dir: Option<PathBuf>,
    /// The update key (minisign public key).
    #[arg(long, default_value = minipacs::update::KEY_FILE)]
    key: PathBuf,
    /// The updater's folder (the package kept for a rollback).
    #[arg(long, default_value = minipacs::update::STATE_DIR)]
    state: PathBuf,
    /// Seconds the restarted service may take to be READY.
    #[arg(long, default_value_t = minipacs::update::DEFAULT_READY_TIMEOUT.as_secs())]
    ready_timeout: u64,
}

#[derive(Subcommand)]
enum LogsCommand {
    /// Write one bounded .tar.gz with logs, audit trail, effective
    /// configuration (secrets redacted), versions, disk state and status.
    Collect {
        /// the bundle to write
        #[arg(long)]
        out: PathBuf,
        /// the service's configuration file (default: built-in defaults)
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a CA: DIR/cacert.pem and DIR/private/cakey.pem (mode 0600).
    New {
        /// the CA folder (created; an existing CA is never overwritten)
        dir: PathBuf,
        /// the CA's common name
        #[arg(long, default_value = ca::DEFAULT_CA_NAME)]
        name: String,
        /// validity in days
        #[arg(long, default_value_t = ca::DEFAULT_CA_DAYS)]
        days: u32,
        /// RSA 2048 instead of ECDSA P-256 (for peers limited to RSA profiles)
        #[arg(long)]
        rsa: bool,
    },
    /// Issue a node certificate (TLS server and client) signed by the CA.
    Issue {
        /// the CA folder
        ca_dir: PathBuf,
        /// where to write the certificate (PEM)
        #[arg(long)]
        cert: PathBuf,
        /// where to write the private key (PKCS#8 PEM, mode 0600)
        #[arg(long)]
        key: PathBuf,
        /// the node's host name or IP address (CN and subjectAltName)
        #[arg(long)]
        name: String,
        /// more host names or addresses for subjectAltName (repeatable)
        #[arg(long)]
        san: Vec<String>,
        /// validity in days
        #[arg(long, default_value_t = ca::DEFAULT_CERT_DAYS)]
        days: u32,
        /// RSA 2048 instead of ECDSA P-256 (for peers limited to RSA profiles)
        #[arg(long)]
        rsa: bool,
    },
}

#[derive(Subcommand)]
enum IndexCommand {
    /// Make the index anew from the store's files (with the server stopped:
    /// refused while one holds the store).
    Rebuild(IndexArgs),
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Each destination's counts: queued, sent (commitment pending),
    /// done, failed, and the oldest undelivered entry's age.
    Status,
    /// Entries, oldest first.
    List {
        /// only this destination's
        #[arg(long)]
        destination: Option<String>,
        /// only entries in this state (queued, sent, done, failed)
        #[arg(long)]
        state: Option<String>,
        /// at most this many
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// one JSON object per line
        #[arg(long)]
        json: bool,
    },
    /// Put a failed entry (or every failed entry of a destination) back in
    /// the queue.
    Retry {
        /// the entry's id (from `list`)
        id: Option<i64>,
        /// every failed entry of this destination
        #[arg(long, conflicts_with = "id")]
        destination: Option<String>,
    },
    /// Remove an entry from the queue: it will not be sent, and retention
    /// no longer waits for it.
    Forget {
        /// the entry's id (from `list`)
        id: i64,
    },
}

#[derive(Args)]
struct IndexArgs {
    /// The service's configuration file (it says where the store and its
    /// index are); options given here win over it.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// The store's folder.
    #[arg(long, visible_alias = "od")]
    output_directory: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file; print every problem with its line.
    Check {
        /// the TOML file
        file: PathBuf,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Configuration file (TOML); options given here win over it.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Address both listeners bind to (e.g. 127.0.0.1 for a trial on this machine only).
    #[arg(long, value_name = "ADDR")]
    bind: Option<std::net::IpAddr>,
    /// TCP port of the plain DICOM listener.
    #[arg(long, short = 'p')]
    port: Option<u16>,
    /// Our AE title.
    #[arg(long, visible_alias = "aet")]
    aetitle: Option<String>,
    /// Where to store received objects.
    #[arg(long, visible_alias = "od")]
    output_directory: Option<PathBuf>,
    /// Naming of stored files.
    #[arg(long, value_enum)]
    layout: Option<LayoutArg>,
    /// Concurrent associations.
    #[arg(long)]
    max_associations: Option<usize>,
    /// Largest PDU we receive, in bytes.
    #[arg(long, visible_alias = "pdu")]
    max_pdu: Option<u32>,
    /// Seconds to complete association negotiation.
    #[arg(long)]
    acse_timeout: Option<u64>,
    /// Seconds of silence before an association is aborted.
    #[arg(long)]
    dimse_timeout: Option<u64>,
    /// Skip fdatasync and folder fsync (durability from elsewhere, or to measure its cost).
    #[arg(long)]
    no_fsync: bool,
    /// Replace an object with the same SOP Instance UID instead of keeping both.
    #[arg(long)]
    overwrite: bool,
    /// Free-space reserve in percent; below it objects are refused with A700.
    #[arg(long)]
    free_space_reserve: Option<u8>,
    /// Serve DICOM over TLS with this private key and certificate chain
    /// (dcmtk's +tls order: key, then certificate).
    #[arg(long, num_args = 2, value_names = ["KEY", "CERT"])]
    tls: Option<Vec<PathBuf>>,
    /// TCP port of the TLS listener.
    #[arg(long)]
    tls_port: Option<u16>,
    /// CA certificate that client certificates must chain to (repeatable).
    #[arg(long)]
    add_cert_file: Vec<PathBuf>,
    /// Folder of CA certificates (repeatable).
    #[arg(long)]
    add_cert_dir: Vec<PathBuf>,
    /// Client certificates: require, verify if sent, or ignore.
    #[arg(long, value_enum)]
    peer_cert: Option<PeerCertArg>,
    /// Preferred AEAD: aes, or chacha20 on boards without AES instructions.
    #[arg(long, value_enum)]
    cipher_preference: Option<CipherArg>,
    /// Do not serve plain DICOM (TLS only).
    #[arg(long)]
    no_plain: bool,
    /// When started as root: the user the network-facing worker runs as.
    #[arg(long)]
    user: Option<String>,
    /// When started as root: the worker's group [default: the user's group].
    #[arg(long)]
    group: Option<String>,
    /// Folder of the service logs and the audit trail.
    #[arg(long, value_name = "DIR")]
    log_directory: Option<PathBuf>,
}

#[derive(Args)]
struct PeerArgs {
    /// Use TLS with this private key and certificate chain (key first).
    #[arg(long, num_args = 2, value_names = ["KEY", "CERT"])]
    tls: Option<Vec<PathBuf>>,
    /// Use TLS without a client certificate.
    #[arg(long, conflicts_with = "tls")]
    anonymous_tls: bool,
    /// CA certificate the server's chain must end in (repeatable); default:
    /// the system's public roots.
    #[arg(long)]
    add_cert_file: Vec<PathBuf>,
    /// Name the server certificate must carry (default: HOST).
    #[arg(long)]
    tls_server_name: Option<String>,
    /// Our (calling) AE title.
    #[arg(long, visible_alias = "aet", default_value = "MINIPACS-SCU")]
    aetitle: String,
    /// The peer's (called) AE title.
    #[arg(long, visible_alias = "aec", default_value = "MINIPACS")]
    call: String,
    /// Seconds to wait for the peer at each step.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Peer host name or address.
    host: String,
    /// Peer TCP port.
    port: u16,
}

impl PeerArgs {
    fn peer(&self) -> anyhow::Result<Peer> {
        config::check_ae_title(&self.aetitle).map_err(|m| anyhow::anyhow!("--aetitle: {m}"))?;
        config::check_ae_title(&self.call).map_err(|m| anyhow::anyhow!("--call: {m}"))?;
        let tls = if self.tls.is_some() || self.anonymous_tls {
            let identity = self.tls.as_ref().map(|kc| (kc[0].clone(), kc[1].clone()));
            let config = tls::client_config(&ClientTlsFiles {
                identity,
                ca_files: self.add_cert_file.clone(),
            })?;
            let name = self.tls_server_name.as_deref().unwrap_or(&self.host);
            Some(ClientTls {
                config: Arc::new(config),
                server_name: tls::server_name(name)?,
            })
        } else {
            None
        };
        Ok(Peer {
            host: self.host.clone(),
            port: self.port,
            scu: ScuOptions {
                calling_ae: self.aetitle.clone(),
                called_ae: self.call.clone(),
                timeout: Duration::from_secs(self.timeout),
            },
            tls,
        })
    }
}

#[derive(Args)]
struct SendArgs {
    #[command(flatten)]
    peer: PeerArgs,
    /// Files and folders (searched recursively).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

#[derive(Args)]
struct EchoArgs {
    #[command(flatten)]
    peer: PeerArgs,
}

fn main() -> ExitCode {
    bound_malloc_arenas();
    let cli = Cli::from_arg_matches(&command_line().get_matches()).unwrap_or_else(|e| e.exit());
    let file_log = logs::init_logging();
    let code = match run(cli, &file_log) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("minipacs: {e:#}");
            ExitCode::FAILURE
        }
    };
    // The file log is written from its own thread: let it finish.
    logs::flush_file_log();
    code
}

/// The command line, with `serve --help` showing the defaults. They are
/// not clap defaults (an option given wins over the file, one not given
/// must not), so they are written into the help from [`Config::default`],
/// the shipped file: the one place they are stated.
fn command_line() -> clap::Command {
    let d = Config::default();
    let defaults = [
        ("bind", shown(d.bind)),
        ("port", shown(d.port)),
        ("aetitle", shown(&d.aetitle)),
        ("output_directory", shown(&d.output_directory)),
        ("layout", shown(d.layout)),
        ("max_associations", shown(d.max_associations)),
        ("max_pdu", shown(d.max_pdu)),
        ("acse_timeout", shown(d.acse_timeout)),
        ("dimse_timeout", shown(d.dimse_timeout)),
        ("free_space_reserve", shown(d.free_space_reserve_percent)),
        ("tls_port", shown(d.tls.port)),
        ("peer_cert", shown(d.tls.peer_cert)),
        ("cipher_preference", shown(d.tls.cipher_preference)),
        ("user", shown(&d.user)),
        ("log_directory", shown(&d.log_directory)),
    ];
    let listeners = format!(
        "Listeners:\n  \
         plain DICOM  on --bind:--port ({bind}:{port}); --no-plain turns it off\n  \
         DICOM/TLS    on --bind:--tls-port ({bind}:{tls_port}) when --tls KEY CERT is given\n\n\
         The defaults are the shipped minipacs.toml's; a --config file (and the board \
         profile it names) changes them, and options given here win over both.",
        bind = d.bind,
        port = d.port,
        tls_port = d.tls.port,
    );
    Cli::command().mut_subcommand("serve", |mut serve| {
        for (id, value) in defaults {
            serve = serve.mut_arg(id, |arg| {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                arg.help(format!("{help} [default: {value}]"))
            });
        }
        serve.after_help(listeners)
    })
}

/// A configuration value as the help shows it: as written in the file,
/// without quotes.
fn shown(value: impl serde::Serialize) -> String {
    match toml::Value::try_from(value) {
        Ok(toml::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(e) => format!("({e})"),
    }
}

/// Where a configuration applied from the drop folder is saved when the
/// service was started without `--config`.
const DEFAULT_CONFIG_FILE: &str = "minipacs.toml";

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli, file_log: &logs::FileLogHandle) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            if let Ok(spec) = std::env::var(privsep::WORKER_ENV) {
                return privsep::run_worker(&spec, file_log);
            }
            let last_good = args
                .config
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_FILE));
            let config = serve_config(args)?;
            if nix::unistd::geteuid().is_root() {
                return privsep::run_keeper(config, last_good, file_log);
            }
            serve_one_process(config, last_good, file_log)
        }
        Command::Send(args) => {
            let peer = args.peer.peer()?;
            let report = runtime()?.block_on(send::send(&peer, &args.paths))?;
            for (path, why) in &report.skipped {
                eprintln!("skipped {}: {why}", path.display());
            }
            for (path, why) in &report.failed {
                eprintln!("FAILED {}: {why}", path.display());
            }
            println!("{}", send::summary_line(&report));
            Ok(if report.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Echo(args) => {
            let peer = args.peer.peer()?;
            let code = runtime()?.block_on(send::echo(&peer))?;
            println!("C-ECHO {}:{} status {code:04X}", peer.host, peer.port);
            Ok(if code == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Dump { files } => {
            let mut ok = true;
            for f in &files {
                match dicom_object::open_file(f) {
                    Ok(obj) => {
                        let meta = obj.meta();
                        println!(
                            "{}: sop_class={} sop_instance={} transfer_syntax={} elements={}",
                            f.display(),
                            meta.media_storage_sop_class_uid(),
                            meta.media_storage_sop_instance_uid(),
                            meta.transfer_syntax(),
                            obj.iter().count()
                        );
                    }
                    Err(e) => {
                        ok = false;
                        eprintln!("{}: {e}", f.display());
                    }
                }
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Logs {
            command: LogsCommand::Collect { out, config },
        } => {
            let config = match &config {
                Some(path) => Config::load(path)?,
                None => Config::default(),
            };
            let summary = logs::collect_bundle(&out, &minipacs::drop::bundle_inputs(&config))?;
            println!(
                "wrote {} ({} bytes, {} members{})",
                summary.path.display(),
                summary.compressed_bytes,
                summary.members.len(),
                if summary.cut.is_empty() {
                    String::new()
                } else {
                    format!("; cut to fit: {}", summary.cut.join(", "))
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca {
            command:
                CaCommand::New {
                    dir,
                    name,
                    days,
                    rsa,
                },
        } => {
            ca::new_ca(&dir, &ca::CaOptions { name, days, rsa })
                .with_context(|| format!("creating CA in {}", dir.display()))?;
            println!(
                "CA created: {} and {}",
                dir.join(ca::CA_CERT_FILE).display(),
                dir.join(ca::CA_KEY_FILE).display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca {
            command:
                CaCommand::Issue {
                    ca_dir,
                    cert,
                    key,
                    name,
                    san,
                    days,
                    rsa,
                },
        } => {
            let issued = ca::issue(
                &ca_dir,
                &cert,
                &key,
                &ca::IssueOptions {
                    name: name.clone(),
                    days,
                    rsa,
                    extra_sans: san,
                },
            )
            .with_context(|| format!("issuing a certificate for {name}"))?;
            println!(
                "issued {} (serial {}, valid until {}), key {}",
                cert.display(),
                issued.serial_hex,
                issued.not_after,
                key.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Index {
            command: IndexCommand::Rebuild(args),
        } => {
            let mut top = Overrides::default();
            top.set("output_directory", args.output_directory.as_ref())?;
            let config = Config::load_with(args.config.as_deref(), top.0)?;
            index_rebuild(&config)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Queue { store, command } => {
            let mut top = Overrides::default();
            top.set("output_directory", store.output_directory.as_ref())?;
            let config = Config::load_with(store.config.as_deref(), top.0)?;
            queue_command(&config, command)
        }
        Command::System {
            command: SystemCommand::Apply { config },
        } => system_apply(&config),
        Command::BootfsWindow {
            mount,
            folder,
            lock,
            hold,
        } => {
            use std::os::fd::AsFd;
            let conn = std::io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .context("the connection on standard input")?;
            minipacs::write_window::serve(
                std::os::unix::net::UnixStream::from(conn),
                &mount,
                &folder,
                &lock,
                Duration::from_secs(hold),
            )
            .context("write window")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Update {
            command: UpdateCommand::Apply(args),
        } => update_apply(args),
        Command::Update {
            command: UpdateCommand::Verify { package, key },
        } => match minipacs::update::verify_file(&package, &key) {
            Ok(()) => {
                println!("{}: good signature ({})", package.display(), key.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(refusal) => {
                eprintln!("{}: {refusal}", package.display());
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match Config::load(&file) {
            Ok(config) => {
                println!("{}: valid", file.display());
                for note in config.notes() {
                    println!("note: {note}");
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
    }
}

/// Bounds glibc's malloc to two arenas. By default it makes up to eight
/// per core, one for each thread that meets contention, and each keeps its
/// freed memory: with tokio's blocking threads coming and going, the
/// worker's memory crept up for half an hour in the soak (PSS 20 to 23 MiB)
/// before it levelled. The receive path allocates nothing per PDU, so two
/// arenas cost no measurable contention. The environment's
/// MALLOC_ARENA_MAX, when set, wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn bound_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; it is called
        // first thing in main, before this process starts any thread, and
        // its result (0 on a refusal) needs no handling: the default
        // arenas are merely larger.
        unsafe {
            nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn bound_malloc_arenas() {}

/// `minipacs system apply`: the outcome goes to the journal, and a
/// roll-back also to the drop folder's result file, where the technician
/// who dropped the configuration looks.
fn system_apply(config: &std::path::Path) -> anyhow::Result<ExitCode> {
    use minipacs::system::{self, Outcome};
    let report = system::apply(config, &system::Paths::device(), &mut system::Device)
        .with_context(|| format!("applying [time] and [network] of {}", config.display()))?;
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    match report.outcome {
        Outcome::Unchanged => println!("system settings already in force"),
        Outcome::Applied(changed) => println!("system settings applied: {}", changed.join(", ")),
        Outcome::RolledBack { why } => {
            let detail = format!(
                "the new [network] left the device without a link for {} s ({why}); the previous \
                 configuration is back in force and saved again as {}",
                system::LINK_CHECK.as_secs(),
                config.display()
            );
            eprintln!("new network settings rolled back: {detail}");
            match Config::load(config).ok().and_then(|c| c.drop_directory) {
                Some(dir) => minipacs::drop::report(&dir, "ROLLED BACK", &detail),
                None => eprintln!("no drop folder to write the result to"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `minipacs update apply`: the updater, with the device's system (dpkg,
/// systemctl) behind [`minipacs::update::system::Debian`]. Fails (exit 1)
/// only when it could not run or an update could not even be rolled back.
fn update_apply(args: UpdateArgs) -> anyhow::Result<ExitCode> {
    use minipacs::update::{self, system::Debian, Settings, Verdict};
    let config = Config::load(&args.config)?;
    let drop_dir = args
        .drop_dir
        .or_else(|| config.drop_directory.clone())
        .context("no drop folder: give --drop DIR, or set drop_directory in the configuration")?;
    let settings = Settings {
        drop_dir,
        state_dir: args.state,
        key_file: args.key,
        log_dir: config.log_directory.clone(),
        ready_timeout: Duration::from_secs(args.ready_timeout),
        program: PathBuf::from(update::system::PROGRAM),
    };
    let system = Debian {
        config,
        config_file: args.config,
    };
    let outcomes = update::apply(&settings, &system)?;
    for o in &outcomes {
        println!("{}: {}: {}", o.package, o.verdict.word(), o.detail);
    }
    Ok(if outcomes.iter().any(|o| o.verdict == Verdict::Failed) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Serves as one process (started as a normal user: no privilege
/// separation). This process is its own supervisor: it watches the drop
/// folder and speaks to systemd itself, and restarts (by exec) when a
/// dropped configuration needs it, once the service has stopped.
fn serve_one_process(
    config: Config,
    last_good: PathBuf,
    file_log: &logs::FileLogHandle,
) -> anyhow::Result<ExitCode> {
    use std::sync::atomic::{AtomicBool, Ordering};
    tracing::info!("running unprivileged as one process (privilege separation needs root)");
    let sockets = minipacs::net::Sockets::bind(&config)?;
    let folders = minipacs::handover::Folders::open_own(&config)?;
    if let Some(dir) = &folders.logs {
        logs::attach_file_log(file_log, dir, logs::LOG_FILE, config.log_max_bytes);
    }
    let tls = match config.tls.files() {
        Some(files) => minipacs::net::TlsFeed::Files(files),
        None => minipacs::net::TlsFeed::None,
    };
    let restart = Arc::new(AtomicBool::new(false));
    let restart_asked = Arc::clone(&restart);
    let saved_to = last_good.clone();
    minipacs::net::serve_in_process(|shutdown| async move {
        let (events, events_rx) = tokio::sync::mpsc::channel(64);
        shutdown.spawn(service::notify_systemd(events_rx));
        let (live_tx, config_updates) = tokio::sync::mpsc::channel(4);
        if let Some(dir) = config.drop_directory.clone() {
            let (running, shutdown) = (config.clone(), shutdown.clone());
            shutdown.clone().spawn(async move {
                let stop = shutdown.token();
                if minipacs::drop::watch(dir, running, saved_to, live_tx, stop).await {
                    restart_asked.store(true, Ordering::Relaxed);
                    shutdown.stop();
                }
            });
        }
        Ok(minipacs::net::Service {
            config,
            sockets,
            folders,
            tls,
            events,
            config_updates,
        })
    })?;
    if restart.load(Ordering::Relaxed) {
        return Err(privsep::restart_on(&last_good));
    }
    Ok(ExitCode::SUCCESS)
}

/// `minipacs index rebuild`: takes the store's lock (so no server is
/// writing to the store or its index meanwhile), removes the index and
/// makes it anew from the files, with the progress line.
/// `minipacs queue ...`: reads and changes the forwarding queue in the
/// store's index, beside a running server (SQLite takes one writer at a
/// time; the server's workers look at the queue again within seconds).
fn queue_command(config: &Config, command: QueueCommand) -> anyhow::Result<ExitCode> {
    use minipacs::dirfd::Folder;
    use minipacs::index::queue::{Selection, State};
    use minipacs::index::{catchup, Index};
    use std::io::Write;
    let store_path = &config.output_directory;
    let root = Folder::open(store_path)
        .with_context(|| format!("opening the store {}", store_path.display()))?;
    let path = catchup::location(&root, &config.index_file);
    let shown = catchup::display_location(&root, &config.index_file);
    if !path.exists() {
        anyhow::bail!(
            "no index at {}: the server makes it at its first start",
            shown.display()
        );
    }
    let index = Index::open(&path).with_context(|| format!("opening {}", shown.display()))?;
    // Written, not printed: a reader that goes away (`| head`) is an error
    // to report, not a panic.
    let mut out = std::io::stdout().lock();
    let code = match command {
        QueueCommand::Status => {
            let now = minipacs::index::queue::unix_now();
            writeln!(
                out,
                "{:<16} {:>8} {:>8} {:>8} {:>8}  oldest undelivered",
                "destination", "queued", "sent", "done", "failed"
            )?;
            for c in index.queue_counts()? {
                let oldest = c
                    .oldest_undelivered
                    .map(|t| format!("{} s ago", (now - t).max(0)))
                    .unwrap_or_else(|| "-".into());
                writeln!(
                    out,
                    "{:<16} {:>8} {:>8} {:>8} {:>8}  {oldest}",
                    c.destination, c.queued, c.sent, c.done, c.failed
                )?;
            }
            ExitCode::SUCCESS
        }
        QueueCommand::List {
            destination,
            state,
            limit,
            json,
        } => {
            let state = match state.as_deref() {
                None => None,
                Some(word) => Some(State::parse(word).ok_or_else(|| {
                    anyhow::anyhow!("--state {word}: one of queued, sent, done, failed")
                })?),
            };
            for e in index.queue_entries(destination.as_deref(), state, limit)? {
                if json {
                    writeln!(out, "{}", serde_json::to_string(&e)?)?;
                } else {
                    writeln!(
                        out,
                        "{:>8} {:<16} {:<7} {:>3} {:<5} {} {} {}",
                        e.id,
                        e.destination,
                        e.state,
                        e.attempts,
                        e.status.as_deref().unwrap_or("-"),
                        e.sop_instance_uid,
                        e.queued,
                        e.reason
                    )?;
                }
            }
            ExitCode::SUCCESS
        }
        QueueCommand::Retry { id, destination } => {
            let selection = match (id, destination) {
                (Some(id), None) => Selection::Entry(id),
                (None, Some(ae)) => Selection::Destination(ae),
                _ => anyhow::bail!("name an entry id, or --destination AE"),
            };
            let n = index.queue_retry(&selection)?;
            writeln!(
                out,
                "{n} entr{} queued again",
                if n == 1 { "y" } else { "ies" }
            )?;
            if n == 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        QueueCommand::Forget { id } => {
            let destination = index.queue_destination_of(id)?;
            if index.queue_forget(id)? {
                writeln!(
                    out,
                    "entry {id} for {} forgotten",
                    destination.unwrap_or_default()
                )?;
                ExitCode::SUCCESS
            } else {
                eprintln!("no entry {id}");
                ExitCode::FAILURE
            }
        }
    };
    drop(index);
    keep_store_owner(&root, &catchup::files(&path))?;
    Ok(code)
}

/// Run as root on a store served by the worker's user: the files this
/// made or changed stay the store owner's, or the worker could not write
/// them.
fn keep_store_owner(root: &minipacs::dirfd::Folder, files: &[PathBuf]) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let owner = root.stat()?;
    for file in files {
        match std::os::unix::fs::lchown(file, Some(owner.st_uid), Some(owner.st_gid)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("giving {} to the store's owner", file.display()))
            }
        }
    }
    Ok(())
}

fn index_rebuild(config: &Config) -> anyhow::Result<()> {
    use minipacs::dirfd::Folder;
    use minipacs::index::catchup;
    use minipacs::store::{self, LOCK_FILE};
    let store_path = &config.output_directory;
    let root = Folder::open(store_path)
        .with_context(|| format!("opening the store {}", store_path.display()))?;
    // The lock file exists once a server has run here; a store that never
    // had one (files copied in) gets it, owned like the store.
    let had_lock = root.stat_at(LOCK_FILE)?.is_some();
    let lock = store::open_lock_file(&root)?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| {
            anyhow::anyhow!(
                "the store {} is in use by a running minipacs server: stop it first \
                 (the index is rebuilt with the store to itself; a server rebuilds a \
                 missing or unusable index at its start anyway)",
                store_path.display()
            )
        })?;
    let shown = catchup::display_location(&root, &config.index_file);
    let path = catchup::location(&root, &config.index_file);
    catchup::remove(&path)?;
    let started = std::time::Instant::now();
    let (index, _) = catchup::open_for_store(&root, &config.index_file)?;
    // Every object found is queued again for the rules that match it: the
    // old index's record of what was delivered is gone with it, and
    // delivery is at least once.
    index.set_forward_rules(minipacs::forward::rules_of(&config.forward));
    let report = catchup::catch_up(
        &index,
        &root,
        &config.index_file,
        &mut catchup::Progress::log_only(),
    )?;
    drop(index);
    let lock_path = (!had_lock).then(|| root.proc_path().join(LOCK_FILE));
    let made: Vec<PathBuf> = catchup::files(&path).into_iter().chain(lock_path).collect();
    keep_store_owner(&root, &made)?;
    println!(
        "index {} rebuilt: {} object(s) from {} file(s), {} not indexable, in {:.1} s",
        shown.display(),
        report.indexed,
        report.files_seen,
        report.not_indexable,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The configuration `serve` runs on: the pipeline of [`Config::load_with`]
/// with the options given here as its top layer.
fn serve_config(args: ServeArgs) -> anyhow::Result<Config> {
    Ok(Config::load_with(
        args.config.as_deref(),
        args.overrides()?,
    )?)
}

impl ServeArgs {
    /// The options that were given, as a configuration layer: keys named
    /// as in the file, so the pipeline merges and checks them like it.
    fn overrides(&self) -> anyhow::Result<toml::Table> {
        let mut top = Overrides::default();
        if self.no_plain {
            if let Some(port) = self.port {
                anyhow::bail!(
                    "--port sets the plain DICOM listener, which --no-plain turns off: \
                     give the TLS listener's port with --tls-port {port}"
                );
            }
        }
        top.set("bind", self.bind)?;
        top.set("port", self.port)?;
        top.set("aetitle", self.aetitle.as_ref())?;
        top.set("output_directory", self.output_directory.as_ref())?;
        top.set("layout", self.layout.map(Layout::from))?;
        top.set("max_associations", self.max_associations)?;
        top.set("max_pdu", self.max_pdu)?;
        top.set("acse_timeout", self.acse_timeout)?;
        top.set("dimse_timeout", self.dimse_timeout)?;
        top.set("free_space_reserve_percent", self.free_space_reserve)?;
        top.set("fsync", self.no_fsync.then_some(false))?;
        top.set("overwrite", self.overwrite.then_some(true))?;
        top.set("listen_plain", self.no_plain.then_some(false))?;
        top.set("user", self.user.as_ref())?;
        top.set("group", self.group.as_ref())?;
        top.set("log_directory", self.log_directory.as_ref())?;
        let mut tls = Overrides::default();
        tls.set("key", self.tls.as_ref().map(|kc| &kc[0]))?;
        tls.set("cert", self.tls.as_ref().map(|kc| &kc[1]))?;
        tls.set("port", self.tls_port)?;
        tls.set(
            "ca_files",
            Some(&self.add_cert_file).filter(|v| !v.is_empty()),
        )?;
        tls.set(
            "ca_dirs",
            Some(&self.add_cert_dir).filter(|v| !v.is_empty()),
        )?;
        tls.set("peer_cert", self.peer_cert.map(PeerCertPolicy::from))?;
        tls.set(
            "cipher_preference",
            self.cipher_preference.map(CipherPreference::from),
        )?;
        if !tls.0.is_empty() {
            top.0.insert("tls".into(), toml::Value::Table(tls.0));
        }
        Ok(top.0)
    }
}

/// One table of command-line overrides.
#[derive(Default)]
struct Overrides(toml::Table);

impl Overrides {
    /// Sets `key` if the option was given.
    fn set(&mut self, key: &str, value: Option<impl serde::Serialize>) -> anyhow::Result<()> {
        if let Some(value) = value {
            let value = toml::Value::try_from(value).with_context(|| format!("option {key}"))?;
            self.0.insert(key.into(), value);
        }
        Ok(())
    }
}

/// `--layout`: the command line's names for [`Layout`].
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LayoutArg {
    /// `<MOD>.<SOPInstanceUID>`, like storescp -uf
    Flat,
    /// `<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`
    Study,
}

impl From<LayoutArg> for Layout {
    fn from(arg: LayoutArg) -> Self {
        match arg {
            LayoutArg::Flat => Layout::Flat,
            LayoutArg::Study => Layout::Study,
        }
    }
}

/// `--peer-cert`: the command line's names for [`PeerCertPolicy`].
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PeerCertArg {
    /// required and verified
    Require,
    /// verified if sent
    Verify,
    /// not requested
    Ignore,
}

impl From<PeerCertArg> for PeerCertPolicy {
    fn from(arg: PeerCertArg) -> Self {
        match arg {
            PeerCertArg::Require => PeerCertPolicy::Require,
            PeerCertArg::Verify => PeerCertPolicy::Verify,
            PeerCertArg::Ignore => PeerCertPolicy::Ignore,
        }
    }
}

/// `--cipher-preference`: the command line's names for [`CipherPreference`].
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CipherArg {
    /// AES-GCM first
    Aes,
    /// ChaCha20-Poly1305 first
    Chacha20,
}

impl From<CipherArg> for CipherPreference {
    fn from(arg: CipherArg) -> Self {
        match arg {
            CipherArg::Aes => CipherPreference::Aes,
            CipherArg::Chacha20 => CipherPreference::Chacha20,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_options_become_the_top_layer() {
        let cli = Cli::try_parse_from([
            "minipacs",
            "serve",
            "--tls-port",
            "4104",
            "--layout",
            "study",
            "--no-fsync",
            "--no-plain",
            "--tls",
            "/k.pem",
            "/c.pem",
            "--add-cert-file",
            "/ca.pem",
            "--peer-cert",
            "ignore",
            "--cipher-preference",
            "chacha20",
        ])
        .expect("parses");
        let Command::Serve(args) = cli.command else {
            panic!("not serve");
        };
        let c = serve_config(args).expect("valid");
        assert_eq!(
            (c.tls.port, c.layout, c.fsync, c.listen_plain),
            (4104, Layout::Study, false, false)
        );
        assert_eq!(c.tls.key.as_deref(), Some(std::path::Path::new("/k.pem")));
        assert_eq!(c.tls.cert.as_deref(), Some(std::path::Path::new("/c.pem")));
        assert_eq!(c.tls.ca_files, vec![PathBuf::from("/ca.pem")]);
        assert_eq!(c.tls.peer_cert, PeerCertPolicy::Ignore);
        assert_eq!(c.tls.cipher_preference, CipherPreference::Chacha20);
        // Options not given leave the defaults alone.
        let untouched = Config {
            layout: c.layout,
            fsync: c.fsync,
            listen_plain: c.listen_plain,
            tls: c.tls.clone(),
            ..Config::default()
        };
        assert_eq!(c, untouched);
    }

    fn serve(args: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_from(["minipacs", "serve"].iter().chain(args)).expect("parses");
        let Command::Serve(args) = cli.command else {
            panic!("not serve");
        };
        args
    }

    #[test]
    fn bind_and_log_directory_are_options() {
        let c = serve_config(serve(&[
            "--bind",
            "127.0.0.1",
            "--log-directory",
            "/var/log/x",
        ]))
        .expect("valid");
        assert_eq!(c.bind, std::net::IpAddr::from([127, 0, 0, 1]));
        assert_eq!(c.log_directory, PathBuf::from("/var/log/x"));
    }

    #[test]
    fn a_port_with_no_plain_is_refused_naming_tls_port() {
        let args = serve(&["--port", "2762", "--no-plain", "--tls", "/k", "/c"]);
        let err = serve_config(args).expect_err("--port means nothing with --no-plain");
        assert!(err.to_string().contains("--tls-port 2762"), "{err}");
        // dcmtk's habit, one port with TLS on it: the clash names both fixes.
        let err = serve_config(serve(&["--port", "2762", "--tls", "/k", "/c"]))
            .expect_err("both listeners on 2762");
        let text = format!("{err:#}");
        assert!(
            text.contains("--tls-port") && text.contains("--no-plain"),
            "{text}"
        );
    }

    #[test]
    fn serve_help_shows_the_shipped_defaults_and_both_listeners() {
        let mut cmd = command_line();
        cmd.build();
        let serve = cmd.find_subcommand_mut("serve").expect("serve");
        let help = serve.render_help().to_string();
        let d = Config::default();
        for default in [
            format!("[default: {}]", d.port),
            format!("[default: {}]", d.aetitle),
            format!("[default: {}]", d.output_directory.display()),
            format!("[default: {}]", d.tls.port),
            format!("[default: {}]", d.log_directory.display()),
            format!("[default: {}]", d.bind),
            "[default: flat]".to_string(),
        ] {
            assert!(help.contains(&default), "{default} missing:\n{help}");
        }
        let listeners: Vec<_> = help
            .lines()
            .filter(|l| {
                l.trim_start().starts_with("plain DICOM") || l.trim_start().starts_with("DICOM/TLS")
            })
            .collect();
        assert_eq!(listeners.len(), 2, "{help}");
        assert!(listeners[1].contains("--tls KEY CERT"), "{help}");
    }
}
