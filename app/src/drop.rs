//! The drop folder: how a technician talks to an unattended device.
//!
//! They drop a file (onto the card's FAT boot partition, or a share) and
//! pick up the answer beside it:
//! - `minipacs.toml`: a new configuration. It is validated; a bad one is
//!   renamed `minipacs.toml.rejected`, and `minipacs.toml.result` says
//!   exactly why; the service keeps running on its current configuration.
//!   A good one is checked for what validation cannot see (certificate
//!   files that do not load, a store that cannot be made); if that fails it
//!   is rolled back the same way. Otherwise it becomes the last-good
//!   configuration (the `--config` file) and is applied while serving if
//!   only live keys changed ([`Config::restart_reason`]), else the service
//!   restarts cleanly on it: objects in flight finish first.
//! - `collect-logs`: the field log bundle is written next to it as
//!   `minipacs-logs-<time>.tar.gz`, and the trigger is removed.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

use crate::config::Config;
use crate::logs::BundleInputs;

/// The name of a dropped configuration.
pub const CONFIG_DROP: &str = "minipacs.toml";
/// The name of the log bundle trigger.
pub const LOGS_TRIGGER: &str = "collect-logs";
/// How often the folder is looked at.
pub const POLL: Duration = Duration::from_secs(2);

/// What the service must do after a look at the drop folder.
#[derive(Debug, PartialEq)]
pub enum DropAction {
    /// Nothing.
    None,
    /// Apply this configuration while serving (already saved as last-good).
    Apply(Box<Config>),
    /// Restart on the new configuration (already saved as last-good).
    Restart,
}

/// What goes into a field log bundle for this configuration.
pub fn bundle_inputs(config: &Config) -> BundleInputs {
    let status = fs::read_to_string(config.log_directory.join(crate::logs::STATUS_FILE))
        .unwrap_or_else(|_| "no status recorded (service not running?)".into());
    BundleInputs {
        log_dir: config.log_directory.clone(),
        audit_dir: config.log_directory.clone(),
        config_text: toml::to_string(config).unwrap_or_default(),
        version: format!("minipacs {}", env!("CARGO_PKG_VERSION")),
        board_name: config.board.clone().unwrap_or_else(|| "none".into()),
        board_profile: config
            .board
            .as_deref()
            .and_then(crate::config::board_profile)
            .map(str::to_string),
        store_paths: vec![config.output_directory.clone()],
        status,
        max_bytes: BundleInputs::DEFAULT_MAX_BYTES,
    }
}

/// Looks at the drop folder once. `running` is the configuration in force,
/// `last_good` where a new good one is saved. When something was dropped,
/// the folder is written (results, renames, bundles) inside one write
/// window ([`crate::write_window`]): on the image its file system is
/// read-only at all other times.
pub fn look(dir: &Path, running: &Config, last_good: &Path) -> DropAction {
    if !dir.join(LOGS_TRIGGER).exists() && !dir.join(CONFIG_DROP).exists() {
        return DropAction::None;
    }
    let window = crate::write_window::open();
    handle(&window.folder(dir), running, last_good)
}

/// [`look`] once something was dropped and the folder is writable.
fn handle(dir: &Path, running: &Config, last_good: &Path) -> DropAction {
    let trigger = dir.join(LOGS_TRIGGER);
    if trigger.exists() {
        let stamp = time::OffsetDateTime::now_utc()
            .format(&time::macros::format_description!(
                "[year][month][day]T[hour][minute][second]Z"
            ))
            .unwrap_or_else(|_| "now".into());
        let out = dir.join(format!("minipacs-logs-{stamp}.tar.gz"));
        match crate::logs::collect_bundle(&out, &bundle_inputs(running)) {
            Ok(s) => {
                info!(bundle = %s.path.display(), bytes = s.compressed_bytes, "field log bundle written")
            }
            Err(e) => warn!(error = %e, "field log bundle failed"),
        }
        let _ = fs::remove_file(&trigger);
    }
    let dropped = dir.join(CONFIG_DROP);
    if !dropped.exists() {
        return DropAction::None;
    }
    let result_path = dir.join(format!("{CONFIG_DROP}.result"));
    let text = match fs::read_to_string(&dropped) {
        Ok(t) => t,
        Err(e) => {
            refuse(
                &dropped,
                &result_path,
                "REJECTED",
                &format!("cannot read the file: {e}"),
            );
            return DropAction::None;
        }
    };
    let candidate = match Config::from_toml(&text, CONFIG_DROP) {
        Ok(c) => c,
        Err(e) => {
            refuse(&dropped, &result_path, "REJECTED", &e.to_string());
            return DropAction::None;
        }
    };
    if let Err(why) = appliable(&candidate) {
        refuse(
            &dropped,
            &result_path,
            "ROLLED BACK",
            &format!("valid, but it cannot be applied: {why}"),
        );
        return DropAction::None;
    }
    if candidate == *running {
        write_result(
            &result_path,
            "UNCHANGED",
            "the same as the running configuration",
        );
        let _ = fs::remove_file(&dropped);
        return DropAction::None;
    }
    if let Err(e) = crate::config::save_file(last_good, text.as_bytes()) {
        refuse(
            &dropped,
            &result_path,
            "ROLLED BACK",
            &format!(
                "cannot save it as the last-good configuration {}: {e}",
                last_good.display()
            ),
        );
        return DropAction::None;
    }
    let _ = fs::remove_file(&dropped);
    let system = system_note(running, &candidate);
    match running.restart_reason(&candidate) {
        None => {
            write_result(
                &result_path,
                "APPLIED",
                &format!(
                    "saved as {}; applied without a restart (associations in flight keep their settings){system}",
                    last_good.display()
                ),
            );
            info!(config = %last_good.display(), "new configuration from the drop folder; applying it live");
            DropAction::Apply(Box::new(candidate))
        }
        Some(why) => {
            write_result(
                &result_path,
                "APPLIED",
                &format!(
                    "saved as {}; the service restarts on it now ({why} changed; objects in flight finish first){system}",
                    last_good.display()
                ),
            );
            info!(config = %last_good.display(), why, "new configuration from the drop folder; restarting");
            DropAction::Restart
        }
    }
}

/// What the result file adds when `[time]` or `[network]` changed: the
/// system applies those ([`crate::system`]), and may still roll a network
/// change back.
fn system_note(running: &Config, candidate: &Config) -> String {
    let (old, new) = (running.system(), candidate.system());
    let mut changed = Vec::new();
    if old.time != new.time {
        changed.push("[time]");
    }
    if old.network != new.network {
        changed.push("[network]");
    }
    match changed.as_slice() {
        [] => String::new(),
        _ if old.network == new.network => {
            format!("; {} applied by the system now", changed.join(" and "))
        }
        _ => format!(
            "; {} applied by the system now: if the new network leaves the device without a \
             link for {} s, the previous configuration comes back and this file says so",
            changed.join(" and "),
            crate::system::LINK_CHECK.as_secs()
        ),
    }
}

/// Checks what validation cannot: that the certificate files load and make
/// a working TLS configuration, and that the store is a folder or can be
/// made (it is not made here: run by the root keeper, that would make it
/// root's; the restarted service makes it for its worker).
fn appliable(config: &Config) -> Result<(), String> {
    if let Some(files) = config.tls.files() {
        let material = crate::tls::TlsMaterial::read(&files).map_err(|e| e.to_string())?;
        crate::tls::server_config(&material, files.policy()).map_err(|e| e.to_string())?;
    }
    let store = &config.output_directory;
    let existing = store
        .ancestors()
        .find(|p| p.as_os_str().is_empty() || p.exists())
        .unwrap_or(store);
    let is_dir = existing.as_os_str().is_empty() || existing.is_dir();
    if !is_dir {
        return Err(format!(
            "store {}: {} is not a folder",
            store.display(),
            existing.display()
        ));
    }
    Ok(())
}

fn refuse(dropped: &Path, result_path: &Path, verdict: &str, why: &str) {
    warn!(
        verdict,
        why, "dropped configuration refused; the running configuration stays"
    );
    let aside = dropped.with_extension("toml.rejected");
    let _ = fs::rename(dropped, aside);
    write_result(result_path, verdict, why);
}

/// Writes the configuration's result file in the drop folder `dir` from
/// outside a drop's handling (a network change rolled back by
/// [`crate::system`]), inside a write window of its own.
pub fn report(dir: &Path, verdict: &str, detail: &str) {
    let window = crate::write_window::open();
    write_result(
        &window.folder(dir).join(format!("{CONFIG_DROP}.result")),
        verdict,
        detail,
    );
}

/// Writes a result file of the drop folder: the verdict, the time, then
/// why, one to a line, atomically. Shared with the updater
/// ([`crate::update`]), so that every answer a technician reads has one
/// form. Called inside a write window; a failure is logged.
pub fn write_result(path: &Path, verdict: &str, detail: &str) {
    let now = crate::timestamp::rfc3339(std::time::SystemTime::now());
    let text = format!("{verdict}\n{now}\n{detail}\n");
    if let Err(e) = save_atomically(path, text.as_bytes()) {
        warn!(path = %path.display(), error = %e, "cannot write the result file");
    }
}

/// Writes `bytes` to `path` durably and atomically ([`crate::durable`]),
/// so a power cut leaves the old file or the new one, never half of one.
/// The mode is left to the folder (the drop folder may be FAT, which
/// refuses a chmod).
pub fn save_atomically(path: &Path, bytes: &[u8]) -> Result<(), crate::durable::DurableError> {
    crate::durable::write_atomically(
        path,
        ".minipacs-save-",
        bytes,
        None,
        crate::durable::Replace::Allowed,
    )
}

/// Watches the drop folder until a restart is needed or `stop` is
/// cancelled; configurations that apply live go to `live`. Returns whether
/// to restart.
pub async fn watch(
    dir: PathBuf,
    mut running: Config,
    last_good: PathBuf,
    live: tokio::sync::mpsc::Sender<Config>,
    stop: tokio_util::sync::CancellationToken,
) -> bool {
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tick.tick() => {}
        }
        let (d, r, l) = (dir.clone(), running.clone(), last_good.clone());
        let action = tokio::task::spawn_blocking(move || look(&d, &r, &l))
            .await
            .unwrap_or(DropAction::None);
        match action {
            DropAction::None => {}
            DropAction::Restart => return true,
            DropAction::Apply(config) => {
                running = (*config).clone();
                if live.send(*config).await.is_err() {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Config, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let running = Config {
            output_directory: dir.path().join("store"),
            log_directory: dir.path().join("logs"),
            ..Config::default()
        };
        let last_good = dir.path().join("etc.toml");
        (dir, running, last_good)
    }

    #[test]
    fn bad_syntax_is_rejected_with_the_reason() {
        let (dir, running, last_good) = setup();
        fs::write(dir.path().join(CONFIG_DROP), "port = \n").expect("write");
        assert_eq!(look(dir.path(), &running, &last_good), DropAction::None);
        let result = fs::read_to_string(dir.path().join("minipacs.toml.result")).expect("result");
        assert!(result.starts_with("REJECTED\n"), "{result}");
        assert!(result.contains("line 1"), "{result}");
        assert!(dir.path().join("minipacs.toml.rejected").exists());
        assert!(!last_good.exists());
    }

    #[test]
    fn unloadable_certificate_is_rolled_back() {
        let (dir, running, last_good) = setup();
        let text = format!(
            "output_directory = {:?}\n[tls]\nkey = \"/nonexistent/k.pem\"\ncert = \"/nonexistent/c.pem\"\n",
            running.output_directory
        );
        fs::write(dir.path().join(CONFIG_DROP), text).expect("write");
        assert_eq!(look(dir.path(), &running, &last_good), DropAction::None);
        let result = fs::read_to_string(dir.path().join("minipacs.toml.result")).expect("result");
        assert!(result.starts_with("ROLLED BACK\n"), "{result}");
        assert!(result.contains("/nonexistent/k.pem"), "{result}");
    }

    #[test]
    fn a_certificate_from_the_future_is_blamed_on_the_clock() {
        let (dir, running, last_good) = setup();
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["pacs.example".into()]).expect("params");
        params.not_before = time::OffsetDateTime::now_utc() + time::Duration::days(1);
        params.not_after = params.not_before + time::Duration::days(30);
        let cert = params.self_signed(&key).expect("certificate");
        let (key_path, cert_path) = (dir.path().join("k.pem"), dir.path().join("c.pem"));
        fs::write(&key_path, key.serialize_pem()).expect("key file");
        fs::write(&cert_path, cert.pem()).expect("cert file");
        let text = format!(
            "output_directory = {:?}\n[tls]\nkey = {key_path:?}\ncert = {cert_path:?}\n",
            running.output_directory
        );
        fs::write(dir.path().join(CONFIG_DROP), text).expect("write");
        assert_eq!(look(dir.path(), &running, &last_good), DropAction::None);
        let result = fs::read_to_string(dir.path().join("minipacs.toml.result")).expect("result");
        assert!(result.starts_with("ROLLED BACK\n"), "{result}");
        assert!(result.contains("c.pem: the clock reads "), "{result}");
        assert!(result.contains("set [time] ntp"), "{result}");
    }

    #[test]
    fn a_network_change_says_the_system_applies_it() {
        let (dir, running, last_good) = setup();
        let text = format!(
            "output_directory = {:?}\nlog_directory = {:?}\n[network]\naddress = \"192.0.2.10/24\"\n",
            running.output_directory, running.log_directory
        );
        fs::write(dir.path().join(CONFIG_DROP), text).expect("write");
        assert!(matches!(
            look(dir.path(), &running, &last_good),
            DropAction::Apply(_)
        ));
        let result = fs::read_to_string(dir.path().join("minipacs.toml.result")).expect("result");
        assert!(result.starts_with("APPLIED\n"), "{result}");
        assert!(
            result.contains("[network] applied by the system now: if the new network leaves"),
            "{result}"
        );
    }

    #[test]
    fn bundle_names_the_board_and_carries_its_profile() {
        let config = Config::from_toml("board = \"pi4\"\n", "test").expect("config");
        let inputs = bundle_inputs(&config);
        assert_eq!(inputs.board_name, "pi4");
        let profile = inputs.board_profile.expect("profile text");
        assert!(profile.contains("Raspberry Pi 4"), "{profile}");
        let inputs = bundle_inputs(&Config::default());
        assert_eq!(inputs.board_name, "none");
        assert_eq!(inputs.board_profile, None);
    }

    #[test]
    fn good_config_becomes_last_good_and_applies_live() {
        let (dir, running, last_good) = setup();
        let text = format!(
            "aetitle = \"BEDSIDE\"\noutput_directory = {:?}\nlog_directory = {:?}\n",
            running.output_directory, running.log_directory
        );
        fs::write(dir.path().join(CONFIG_DROP), &text).expect("write");
        assert!(
            matches!(look(dir.path(), &running, &last_good), DropAction::Apply(c) if c.aetitle == "BEDSIDE")
        );
        assert_eq!(fs::read_to_string(&last_good).expect("saved"), text);
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&last_good)
                .expect("saved")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o644, "readable by the worker's user");
        }
        assert!(!dir.path().join(CONFIG_DROP).exists());
        let result = fs::read_to_string(dir.path().join("minipacs.toml.result")).expect("result");
        assert!(result.starts_with("APPLIED\n"), "{result}");
        assert!(result.contains("without a restart"), "{result}");
        // A port change restarts.
        let text = format!("port = 104\n{text}");
        fs::write(dir.path().join(CONFIG_DROP), &text).expect("write");
        assert_eq!(look(dir.path(), &running, &last_good), DropAction::Restart);
    }
}
