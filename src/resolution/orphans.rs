//! Orphaned input files (review L12): copies of a window's input that
//! carpool uploaded but never recorded. An upload whose answer timed out
//! may have gone through before carpool uploaded again; a crash between
//! an upload and recording its file id leaves a file the restart does not
//! know of. Both carry the window's name ([`input_filename`]).
//!
//! The choice: extra copies are deleted, not adopted. Once a window's
//! upload is recorded, the files of its name other than the recorded one
//! are deleted ([`drop_surplus_copies`]); the janitor's pass ([`sweep`])
//! deletes what that missed: files named for a window that is finished
//! or failed, or that holds a different recorded file. A file whose name
//! is not a window input's, or whose window this store does not hold (it
//! may be another deployment's), is never touched.

use std::collections::HashSet;

use crate::config::AuthMode;
use crate::deferral::engine::{now_ms, Deferral};
use crate::model::{Scope, WindowId};
use crate::providers::{input_filename, window_of_input, BatchClient, FileView};
use crate::store::{StoreError, WindowRecord, WindowState};

/// How far before a window was sealed its copies may have been made (clock
/// skew between carpool and the provider).
const SKEW_SECS: i64 = 3600;

/// Deletes the copies of `window`'s input other than `kept`, the one just
/// recorded. Best effort: a failure is logged and left to [`sweep`].
pub async fn drop_surplus_copies(
    client: &BatchClient,
    key: &str,
    window: &WindowRecord,
    kept: &str,
) {
    drop_copies_but(client, key, window, Some(kept)).await;
}

/// At the end of a window on a passthrough upstream (`key` is its owner's):
/// deletes every copy of its input but the recorded one, which the window's
/// own clean-up deletes or keeps (`delete_files`). Managed windows are left
/// to [`sweep`], which lists carpool's own key whenever it likes.
pub async fn drop_copies_at_end(
    client: &BatchClient,
    auth: AuthMode,
    key: &str,
    window: &WindowRecord,
) {
    if auth == AuthMode::Passthrough {
        drop_copies_but(client, key, window, window.file_id.as_deref()).await;
    }
}

async fn drop_copies_but(
    client: &BatchClient,
    key: &str,
    window: &WindowRecord,
    kept: Option<&str>,
) {
    let since = window.sealed_at.unwrap_or(window.opened_at) / 1000 - SKEW_SECS;
    let listed = match client.list_input_files(key, since).await {
        Ok(listed) => listed,
        Err(err) => {
            tracing::warn!(window = %window.id, error = %err, "could not list provider files to find surplus input copies");
            return;
        }
    };
    let name = input_filename(&window.id);
    for file in listed
        .iter()
        .filter(|f| f.filename == name && Some(f.id.as_str()) != kept)
    {
        delete(client, key, &window.id, file).await;
    }
}

async fn delete(client: &BatchClient, key: &str, window: &WindowId, file: &FileView) {
    match client.delete_file(key, &file.id).await {
        Ok(()) => {
            tracing::info!(window = %window, file = %file.id, "deleted an orphaned input file");
        }
        Err(err) => {
            tracing::warn!(window = %window, file = %file.id, error = %err, "could not delete an orphaned input file");
        }
    }
}

/// Whether `file`, named for `window`, is an orphan to delete.
fn orphaned(window: &WindowRecord, file: &FileView, delete_files: bool) -> bool {
    let recorded = window.file_id.as_deref();
    match window.state {
        // A finished window's own file is deleted when it finished, if
        // `delete_files` says so; any other copy is surplus.
        WindowState::Completed | WindowState::Failed => {
            recorded != Some(file.id.as_str()) || delete_files
        }
        // Not uploaded yet (or back to sealed): the upload in progress may
        // be this very file; its submission deletes the extra copies.
        WindowState::Open | WindowState::Sealed => false,
        WindowState::Uploaded | WindowState::Creating | WindowState::Submitted => {
            recorded.is_some_and(|r| r != file.id)
        }
    }
}

/// One upstream account whose files are looked through.
#[derive(PartialEq, Eq, Hash)]
struct Account {
    upstream: String,
    key: String,
    scope: Scope,
}

/// One janitor pass over the provider files of every account carpool can
/// list: each managed upstream's own key, and the key and scope of every
/// window on its way to a job or with one running.
pub async fn sweep(deferral: &Deferral) -> Result<usize, StoreError> {
    let mut accounts = HashSet::new();
    for (name, upstream) in &deferral.upstreams {
        if let (AuthMode::Managed, Some(key)) = (upstream.config.auth, &upstream.config.api_key) {
            accounts.insert(Account {
                upstream: name.clone(),
                key: key.expose().to_owned(),
                scope: Scope::default(),
            });
        }
    }
    let active = [
        WindowState::Sealed,
        WindowState::Uploaded,
        WindowState::Creating,
        WindowState::Submitted,
    ];
    for window in deferral.store.windows_in(&active).await? {
        let Some(upstream) = deferral.upstream(&window.key.upstream) else {
            continue;
        };
        if let Some(key) = upstream.key_for(&window) {
            accounts.insert(Account {
                upstream: window.key.upstream.clone(),
                key: key.to_owned(),
                scope: window.key.scope.clone(),
            });
        }
    }
    let ttl = i64::try_from(deferral.config.batching.results_ttl.as_secs()).unwrap_or(i64::MAX);
    let since = (now_ms() / 1000)
        .saturating_sub(ttl)
        .saturating_sub(SKEW_SECS);
    let mut deleted = 0;
    for account in accounts {
        let Some(upstream) = deferral.upstream(&account.upstream) else {
            continue;
        };
        let client = upstream.client.scoped(&account.scope);
        let listed = match client.list_input_files(&account.key, since).await {
            Ok(listed) => listed,
            Err(err) => {
                tracing::warn!(upstream = %account.upstream, error = %err, "could not list provider files to find orphaned inputs");
                continue;
            }
        };
        for file in listed {
            let Some(id) = window_of_input(&file.filename) else {
                continue;
            };
            let Some(window) = deferral.store.window(&id).await? else {
                continue;
            };
            if orphaned(&window, &file, deferral.config.batching.delete_files) {
                delete(&client, &account.key, &id, &file).await;
                deleted += 1;
            }
        }
    }
    Ok(deleted)
}
